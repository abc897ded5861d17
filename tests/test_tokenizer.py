"""train_tokenizer.py: every kind reloads through AutoTokenizer with its special tokens, template and word ids."""
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from ipu_train.errors import UserError
from tests.conftest import FIXTURE_VOCAB_SIZE, REPO
from train_tokenizer import train_tokenizer

PAIR = ("The interpreter reads a line.", "It prints the result.")


def tokens(tokenizer, *texts):
    encoding = tokenizer(*texts)
    return encoding, tokenizer.convert_ids_to_tokens(encoding["input_ids"])


def test_gpt2_bpe(bpe_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_tokenizer_dir)
    assert tokenizer.is_fast and len(tokenizer) == FIXTURE_VOCAB_SIZE
    assert tokenizer.model_max_length == 1024
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and tokenizer.mask_token is None
    encoding, pieces = tokens(tokenizer, PAIR[0])
    assert "<|endoftext|>" not in pieces  # GPT-2 adds no special tokens
    assert "token_type_ids" not in encoding
    assert tokenizer.decode(encoding["input_ids"]) == PAIR[0]  # byte level: lossless


def test_roberta_bpe(roberta_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(roberta_tokenizer_dir)
    assert tokenizer.model_max_length == 512
    ids = {role: getattr(tokenizer, f"{role}_token_id") for role in ("bos", "pad", "eos", "unk", "mask", "cls", "sep")}
    assert ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4, "cls": 0, "sep": 2}
    encoding, pieces = tokens(tokenizer, *PAIR)
    first_sep = pieces.index("</s>")
    assert pieces[0] == "<s>" and pieces[first_sep:first_sep + 2] == ["</s>", "</s>"] and pieces[-1] == "</s>"
    assert "token_type_ids" not in encoding
    # The mask token takes the space before it, as roberta-base's does.
    assert tokenizer("a <mask>")["input_ids"][-2] == tokenizer.mask_token_id
    assert tokenizer.decode(encoding["input_ids"], skip_special_tokens=True) == "".join(PAIR)


def test_bert_wordpiece(wordpiece_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    encoding, pieces = tokens(tokenizer, *PAIR)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and pieces.count("[SEP]") == 2
    boundary = pieces.index("[SEP]") + 1
    assert encoding["token_type_ids"] == [0] * boundary + [1] * (len(pieces) - boundary)
    assert all(piece == piece.lower() for piece in pieces if not piece.startswith("["))
    # Word ids follow words, not pieces: every "##" piece belongs to the word before it.
    word_ids = encoding.word_ids()
    assert word_ids[0] is None and word_ids[-1] is None
    assert any(piece.startswith("##") for piece in pieces)
    for position, piece in enumerate(pieces):
        if piece.startswith("##"):
            assert word_ids[position] == word_ids[position - 1]


def test_xlnet_unigram(unigram_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(unigram_tokenizer_dir)
    assert tokenizer.padding_side == "left"
    assert [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id] == list(range(7))
    encoding, pieces = tokens(tokenizer, *PAIR)
    assert pieces[-2:] == ["<sep>", "<cls>"] and pieces.count("<sep>") == 2
    boundary = pieces.index("<sep>") + 1
    assert encoding["token_type_ids"] == [0] * boundary + [1] * (len(pieces) - boundary - 1) + [2]
    batch = tokenizer(["short", PAIR[0]], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert tokenizer.decode(encoding["input_ids"], skip_special_tokens=True) == " ".join(PAIR)


def test_model_max_length_is_kept(corpus_slice, tmp_path):
    train_tokenizer([corpus_slice], "wordpiece", 400, tmp_path, model_max_length=128)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 128


@pytest.mark.parametrize("kwargs, flag", [
    ({"files": ["missing.txt"]}, "--files"),
    ({"vocab_size": 100}, "--vocab_size"),
    ({"kind": "sentencepiece"}, "--type"),
    ({"style": "bert"}, "--style"),
    ({"kind": "unigram", "style": "gpt2"}, "--style"),
    ({"model_max_length": 0}, "--model_max_length"),
])
def test_user_errors_name_the_flag(corpus_slice, tmp_path, kwargs, flag):
    arguments = {"files": [corpus_slice], "kind": "bpe", "vocab_size": 500, "output_dir": tmp_path / "out"}
    arguments.update(kwargs)
    with pytest.raises(UserError, match=flag):
        train_tokenizer(**arguments)
    assert not (tmp_path / "out").exists()


def test_empty_files_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        train_tokenizer([empty], "wordpiece", 500, tmp_path / "out")


def test_cli_error_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_tokenizer.py"), "--type", "bpe", "--files", str(tmp_path / "no.txt"),
         "--vocab_size", "500", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --files: no such file: {tmp_path / 'no.txt'}"]


def test_cli_trains_and_saves(corpus_slice, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train_tokenizer.py"), "--type", "bpe", "--style", "roberta", "--files",
         str(corpus_slice), "--vocab_size", "400", "--output_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == 400
