#!/usr/bin/env python
"""Train a tokenizer from text files and save it so that `AutoTokenizer.from_pretrained(output_dir)` reloads it.

    python train_tokenizer.py --type bpe --style gpt2 --files data/corpus/train.txt --vocab_size 8000 \\
        --output_dir tokenizers/gpt2

| --type | for | special tokens | template |
|---|---|---|---|
| bpe --style gpt2 | GPT-2 | <|endoftext|> (bos, eos, unk) | none |
| bpe --style roberta | RoBERTa | <s> <pad> </s> <unk> <mask> | <s> A </s></s> B </s> |
| wordpiece | BERT (lowercased) | [PAD] [UNK] [CLS] [SEP] [MASK] | [CLS] A [SEP] B [SEP], token_type_ids 0/1 |
| unigram | XLNet | <unk> <s> </s> <cls> <sep> <pad> <mask> | A <sep> B <sep> <cls>, types 0/1/2, left padding |

Special tokens take the first ids, in the order shown, so that the model configs' default ids fit: BERT
pad 0; RoBERTa bos 0, pad 1, eos 2; XLNet bos 1, eos 2, pad 5. GPT-2's <|endoftext|> is id 0 (the config's
bos/eos ids must be set from the tokenizer). Every tokenizer is a fast one, so `word_ids()` gives the word
boundaries used by whole-word masking.
"""
import argparse
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ipu_train.cli import one_line_errors
from ipu_train.errors import UserError

KINDS = ("bpe", "wordpiece", "unigram")
BPE_STYLES = ("gpt2", "roberta")
BYTE_ALPHABET_SIZE = 256

# Role -> token, in id order.
SPECIAL_TOKENS = {
    "gpt2": {"bos_token": "<|endoftext|>"},
    "roberta": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "mask_token": "<mask>"},
    "wordpiece": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "unigram": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<cls>",
                "sep_token": "<sep>", "pad_token": "<pad>", "mask_token": "<mask>"},
}


def _style_of(kind, style):
    if kind not in KINDS:
        raise UserError(f"--type must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind != "bpe":
        if style is not None:
            raise UserError(f"--style applies to --type bpe only; drop it for --type {kind}")
        return kind
    style = style or "gpt2"
    if style not in BPE_STYLES:
        raise UserError(f"--style must be one of {', '.join(BPE_STYLES)}; got {style!r}")
    return style


def _roles(style):
    """Token per role, with the roles a style shares (GPT-2's one token; RoBERTa's <s>/</s> as cls/sep)."""
    roles = dict(SPECIAL_TOKENS[style])
    if style == "gpt2":
        roles.update(eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if style == "roberta":
        roles.update(cls_token="<s>", sep_token="</s>")
    return roles


def _check_inputs(files, vocab_size, style):
    paths = [Path(f) for f in files]
    if not paths:
        raise UserError("--files needs at least one text file")
    for path in paths:
        if not path.is_file():
            raise UserError(f"--files: no such file: {path}")
    if all(path.stat().st_size == 0 for path in paths):
        raise UserError("--files: every file is empty; give text to train on")
    special_count = len(SPECIAL_TOKENS[style])
    minimum = special_count + (BYTE_ALPHABET_SIZE if style in BPE_STYLES else 1)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise UserError(f"--vocab_size must be an integer of at least {minimum} for this tokenizer type; "
                        f"got {vocab_size!r}")
    return [str(path) for path in paths]


def _pipeline(style, vocab_size, min_frequency):
    """An untrained tokenizer and its trainer for one style."""
    special = list(SPECIAL_TOKENS[style].values())
    if style in BPE_STYLES:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif style == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=special, continuing_subword_prefix="##",
                                            show_progress=False)
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>",
                                          show_progress=False)
    return tokenizer, trainer


def _post_processor(style, tokenizer):
    def token(text):
        return text, tokenizer.token_to_id(text)

    if style == "gpt2":
        return processors.ByteLevel(trim_offsets=False)
    if style == "roberta":
        # tokenizers 0.23 takes sep and cls positionally.
        return processors.RobertaProcessing(token("</s>"), token("<s>"), trim_offsets=True, add_prefix_space=False)
    if style == "wordpiece":
        return processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                             special_tokens=[token("[CLS]"), token("[SEP]")])
    return processors.TemplateProcessing(single="$A <sep> <cls>:2", pair="$A <sep> $B:1 <sep>:1 <cls>:2",
                                         special_tokens=[token("<sep>"), token("<cls>")])


def _model_input_names(style):
    # BERT and XLNet take segment ids; GPT-2 and RoBERTa do not.
    if style in ("wordpiece", "unigram"):
        return ["input_ids", "token_type_ids", "attention_mask"]
    return ["input_ids", "attention_mask"]


def train_tokenizer(files, kind, vocab_size, output_dir, style=None, model_max_length=None, min_frequency=2):
    """Train a `kind` ("bpe", "wordpiece", "unigram") tokenizer on `files`, save it to `output_dir`, return it.

    `style` ("gpt2" or "roberta") picks the BPE flavour; `model_max_length` defaults to 1024 for GPT-2, else 512.
    Raises UserError on a missing or empty file, an unknown type or style, or a too small vocabulary.
    """
    style = _style_of(kind, style)
    paths = _check_inputs(files, vocab_size, style)
    if model_max_length is not None and model_max_length < 1:
        raise UserError(f"--model_max_length must be a positive number of tokens; got {model_max_length}")
    tokenizer, trainer = _pipeline(style, vocab_size, min_frequency)
    tokenizer.train(paths, trainer)
    tokenizer.post_processor = _post_processor(style, tokenizer)

    roles = _roles(style)
    if style == "roberta":
        # As in roberta-base: "<mask>" swallows the space before it, so "a <mask>." masks the word " b".
        roles["mask_token"] = AddedToken("<mask>", lstrip=True, rstrip=False, special=True)
    if model_max_length is None:
        model_max_length = 1024 if style == "gpt2" else 512
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        padding_side="left" if style == "unigram" else "right",
        model_input_names=_model_input_names(style),
        **roles,
    )
    wrapped.save_pretrained(output_dir)
    return wrapped


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", dest="kind", required=True, choices=KINDS, help="tokenizer model")
    parser.add_argument("--style", choices=BPE_STYLES, default=None,
                        help="special tokens and template for --type bpe (default gpt2)")
    parser.add_argument("--files", nargs="+", required=True, help="plain-text training files")
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_max_length", type=int, default=None, help="default 1024 for gpt2, else 512")
    parser.add_argument("--min_frequency", type=int, default=2, help="BPE and WordPiece: minimum pair frequency")
    return parser.parse_args(argv)


@one_line_errors()
def main(argv=None):
    """Train and save the tokenizer, and return 0; a UserError is one `error:` line and exit code 2."""
    args = parse_args(argv)
    tokenizer = train_tokenizer(args.files, args.kind, args.vocab_size, args.output_dir, style=args.style,
                                model_max_length=args.model_max_length, min_frequency=args.min_frequency)
    print(f"saved a {len(tokenizer)}-token {args.kind} tokenizer to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
