"""Data pieces the four scripts share: block grouping, capped dynamic masking, BERT next-sentence pairs, PLM batches.

Randomness: the collators draw from torch's global RNG, so the trainer's seeding, its per-worker seeding and its
checkpointed RNG state reproduce the masks on resume. The NSP builder is seeded per document (see
`build_nsp_pairs`), so `datasets.map` gives the same pairs for any batch size and any `num_proc`.
"""
import dataclasses
import functools
import itertools
import math
import os
import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import BatchEncoding, DataCollatorForPermutationLanguageModeling
from transformers.data.data_collator import pad_without_fast_tokenizer_warning

from ipu_train.compat import DataCollatorForLanguageModeling
from ipu_train.errors import UserError
from ipu_train.pipeline.heads import IGNORE_INDEX


# ----------------------------------------------------------------------------------------------- grouping

def group_texts(examples: dict[str, list], block_size: int) -> dict[str, list]:
    """Concatenate every column of a tokenized batch and cut it into blocks of `block_size` tokens.

    The remainder shorter than a block is dropped (Hugging Face example semantics), so a batch with fewer than
    `block_size` tokens yields no block. The CLM script adds `labels` itself.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    concatenated = {key: [token for row in rows for token in row] for key, rows in examples.items()}
    total = len(next(iter(concatenated.values()), []))
    usable = total - total % block_size
    return {key: [values[start:start + block_size] for start in range(0, usable, block_size)]
            for key, values in concatenated.items()}


# ----------------------------------------------------------------------------------------------- masking

def masked_token_cap(seq_len: int, probability: float) -> int:
    """Static cap on masked tokens per sequence: mean plus two standard deviations, rounded up to 16, at most L."""
    mean = seq_len * probability
    bound = mean + 2 * math.sqrt(mean * (1 - probability))
    return min(seq_len, 16 * math.ceil(bound / 16))


@dataclasses.dataclass
class DataCollatorForCappedMLM(DataCollatorForLanguageModeling):
    """transformers' MLM collator with a static cap on the masked tokens of each sequence.

    - Masking is the parent's: each maskable token (or word) is selected with probability `mlm_probability`, then
      80% `[MASK]` / 10% a random token of the whole vocabulary / 10% kept (`mask_replace_prob`,
      `random_replace_prob`); labels hold the original ids there and -100 elsewhere. Whole-word masking
      (`whole_word_mask`) masks every selected word with `[MASK]`, as transformers does.
    - Added here, `max_masked_tokens`: None (no cap: evaluation, which must never drop a masked token), an int, or
      "auto" = `masked_token_cap(L, mlm_probability)` for the padded length L. Where more were selected, a random
      subset of whole words (single tokens without whole-word masking) is kept while it fits under the cap, so a
      pipelined model can gather a fixed number of predictions. `dataclasses.replace(collator,
      max_masked_tokens=None)` gives the evaluation collator.
    - Word boundaries come from a `word_ids` column (`encoding.word_ids(i)` at tokenization, None for special
      tokens): exact for every fast tokenizer, including byte-level BPE. Without that column (and for examples given as
      lists of ids) a WordPiece tokenizer's "##" continuation pieces mark them; other tokenizers then raise.
    - `token_type_ids` and `next_sentence_label` pass through; `word_ids` and `special_tokens_mask` are consumed.
    - Host cost: rows are stacked, or padded as tokenizer.pad pads them, with one conversion per column (not
      tokenizer.pad's per-row Python path), and special tokens are looked up per id, not tested per token in Python;
      the batch and the random draws are the parent's (tests/test_collator_fast.py, benchmarks/collate.py).
    """

    consumed_columns: ClassVar[tuple[str, ...]] = ("word_ids", "special_tokens_mask")  # read here, not by the model

    max_masked_tokens: int | str | None = None

    def __post_init__(self):
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise UserError("masked LM needs a tokenizer with mask and padding tokens: use one made for BERT or "
                            "RoBERTa (train_tokenizer.py --type wordpiece, or --type bpe --style roberta)")
        if not (self.max_masked_tokens in (None, "auto")
                or (isinstance(self.max_masked_tokens, int) and self.max_masked_tokens >= 1)):
            raise ValueError(f"max_masked_tokens must be None, 'auto' or an int >= 1; got {self.max_masked_tokens!r}")
        if self.return_tensors != "pt":
            raise ValueError("the cap is applied to torch batches: return_tensors must be 'pt'")
        super().__post_init__()
        self._special_ids = torch.tensor(self.tokenizer.all_special_ids)  # as get_special_tokens_mask tests them
        self._is_special = torch.zeros(max(len(self.tokenizer), *self.tokenizer.all_special_ids) + 1, dtype=torch.bool)
        self._is_special[self._special_ids] = True  # per id: a lookup, 6x faster than torch.isin
        self._continuation = None  # per-vocabulary "##" flags, built on first use without a word_ids column

    def cap_for(self, seq_len: int) -> int | None:
        if self.max_masked_tokens == "auto":
            return masked_token_cap(seq_len, self.mlm_probability)
        return self.max_masked_tokens

    def torch_call(self, examples: list[dict[str, Any] | list[int]]) -> dict[str, torch.Tensor]:
        if not isinstance(examples[0], Mapping):  # lists of ids: the parent pads them, WordPiece pieces give words
            return super().torch_call(examples)
        columns = [{key: value for key, value in example.items() if key != "word_ids"} for example in examples]
        if not self.mlm:  # labels are the inputs: nothing to mask
            return super().torch_call(columns)
        self._seed_generator()
        batch = self._padded(columns)
        if batch is None:  # values only tokenizer.pad handles
            batch = pad_without_fast_tokenizer_warning(self.tokenizer, columns, return_tensors="pt",
                                                       pad_to_multiple_of=self.pad_to_multiple_of)
        special_tokens_mask = batch.pop("special_tokens_mask", None)
        offset_mapping = batch.pop("offset_mapping", None)
        if self.whole_word_mask and examples[0].get("word_ids") is not None:
            offset_mapping = self._offsets(self._padded_word_ids(examples))
        batch["input_ids"], batch["labels"] = self.torch_mask_tokens(batch["input_ids"], special_tokens_mask,
                                                                     offset_mapping)
        return batch

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        if special_tokens_mask is None:  # the parent's test, get_special_tokens_mask, is a Python loop over tokens
            special_tokens_mask = self._special_tokens(inputs)
        if self.whole_word_mask and offset_mapping is None:  # no word_ids column: "##" pieces continue a word
            offset_mapping = self._offsets((~self._continuation_flags()[inputs]).long().cumsum(dim=1))
        inputs, labels = super().torch_mask_tokens(inputs, special_tokens_mask, offset_mapping)
        if not self.whole_word_mask:  # whole words were capped when chosen, in _whole_word_mask
            masked = labels != IGNORE_INDEX
            each_token_a_word = torch.arange(masked.shape[1]).expand_as(masked)
            dropped = masked & ~self._within_cap(masked, each_token_a_word)
            inputs[dropped] = labels[dropped]  # labels hold the original ids of masked tokens
            labels[dropped] = IGNORE_INDEX
        return inputs, labels

    def _special_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Where `inputs` holds one of the tokenizer's special ids: looked up per id, or by torch.isin for ids
        outside the vocabulary."""
        if (inputs.dtype in (torch.int64, torch.int32) and inputs.numel()  # (uint8 and bool would index as masks)
                and 0 <= int(inputs.min()) and int(inputs.max()) < len(self._is_special)):
            return self._is_special[inputs]
        return torch.isin(inputs, self._special_ids)

    def _seed_generator(self):
        """The generator as the parent's torch_call seeds it (this one pads dicts itself): once per process, with
        seed plus the DataLoader worker's id."""
        if self.seed is not None and (self._generator_pid != os.getpid()
                                      or not isinstance(self.generator, torch.Generator)):
            worker = torch.utils.data.get_worker_info()
            self.generator = torch.Generator().manual_seed(self.seed + (worker.id if worker is not None else 0))
            self._generator_pid = os.getpid()

    def _padded(self, columns: list[dict[str, Any]]) -> BatchEncoding | None:
        """tokenizer.pad's batch, built with one conversion per column; None where only tokenizer.pad can build it.

        tokenizer.pad's per-token Python path (then `torch.tensor` on nested lists) costs milliseconds a batch, tens
        of them for rows of different lengths. Rows that need no padding are stacked as they are: numpy values
        beside lists of ids keep their dtype, everything else becomes Python lists, then int64, bool or
        default-float tensors. Rows to pad (lists of ids of different lengths, or a length off
        `pad_to_multiple_of`) are padded here as tokenizer.pad pads them, where every column is one it pads (ids,
        token types, attention and special-token masks, lists of ints as long as the ids) or a value per row.
        """
        lengths = [len(example["input_ids"]) for example in columns]
        multiple = self.pad_to_multiple_of or 1
        width = -(-max(lengths) // multiple) * multiple
        if not width:
            return None
        padding = self._padding_values() if any(length != width for length in lengths) else {}
        if padding is None:
            return None
        if padding:  # where each row's tokens go
            position, lengths_column = np.arange(width), np.array(lengths)[:, None]
            real = (position >= width - lengths_column if self.tokenizer.padding_side == "left"
                    else position < lengths_column)
        arrays_kept = isinstance(columns[0]["input_ids"], (list, tuple))
        python_dtypes = {"b": torch.bool, "i": torch.long, "u": torch.long, "f": torch.get_default_dtype()}
        batch = {}
        for key in columns[0]:
            values = [example[key] for example in columns]
            if key in padding:  # padded: int64, as torch.tensor makes ints and bools beside the padding's ints
                if not all(type(value) is list and len(value) == length for value, length in zip(values, lengths)):
                    return None
                flat = np.array(list(itertools.chain.from_iterable(values)))
                if flat.dtype.kind not in "ib":
                    return None
                padded = np.full((len(columns), width), padding[key], dtype=np.int64)
                padded[real] = flat
                batch[key] = torch.from_numpy(padded)
                continue
            try:
                array = np.array(values)
            except ValueError:  # lists of different lengths, which tokenizer.pad does not pad either
                return None
            if arrays_kept and isinstance(values[0], (np.ndarray, np.generic)):
                batch[key] = torch.from_numpy(array)
            elif array.dtype.kind in python_dtypes:
                batch[key] = torch.from_numpy(array).to(python_dtypes[array.dtype.kind])
            else:  # strings, None: tokenizer.pad says what it cannot convert
                return None
        if "attention_mask" not in batch and "attention_mask" in self.tokenizer.model_input_names:
            batch["attention_mask"] = (torch.from_numpy(real.astype(np.int64)) if padding
                                       else torch.ones(len(columns), width, dtype=torch.long))
        return BatchEncoding(batch)

    def _padding_values(self) -> dict[str, int] | None:
        """The columns tokenizer.pad pads, with their padding values; None where this tokenizer pads otherwise."""
        tokenizer = self.tokenizer
        if tokenizer.model_input_names[0] != "input_ids" or tokenizer.padding_side not in ("left", "right"):
            return None
        padding = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id,
                   "special_tokens_mask": 1}
        if "attention_mask" in tokenizer.model_input_names:  # tokenizer.pad leaves it as it is otherwise
            padding["attention_mask"] = 0
        return padding

    def _whole_word_mask(self, word_ids, mask):
        """The parent's whole words (-1: special token), capped before their tokens are replaced.

        A word is selected where any of its tokens is: a scatter over word ids, O(B·L) where the parent compares
        every pair of tokens (a [B, L, L] array). Word ids run from -1 to L: slot id + 1 of L + 2, slot 0 never chosen.
        """
        words = torch.from_numpy(word_ids)
        slot = words + 1
        chosen = torch.zeros(words.shape[0], words.shape[1] + 2, dtype=torch.bool)
        chosen.scatter_reduce_(1, slot, torch.as_tensor(mask) & (words >= 0), "amax")
        return self._within_cap(chosen.gather(1, slot), words).numpy()

    def _within_cap(self, selected: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """`selected`, less whole words dropped in a random order until each row holds at most `cap` tokens."""
        rows, length = selected.shape
        cap = self.cap_for(length)
        if cap is None or cap >= length:
            return selected
        slot = words.clamp(min=0)  # word ids run up to `length`; -1 (special tokens, never selected) joins slot 0
        word_size = torch.zeros(rows, length + 1, dtype=torch.long).scatter_add_(1, slot, selected.long())
        chosen = word_size > 0
        order = torch.where(chosen, torch.rand(chosen.shape, generator=self.generator), 2.0).argsort(dim=1)
        running = word_size.gather(1, order).cumsum(dim=1)
        fits = torch.zeros_like(chosen).scatter_(1, order, running <= cap)
        return selected & fits.gather(1, slot)

    @staticmethod
    def _offsets(words: torch.Tensor) -> torch.Tensor:
        # transformers finds words from character offsets, which pre-tokenized data lacks: a token continues a word
        # where it starts at the previous token's end, so each token's word index becomes [i + word, i + word + 1).
        starts = torch.arange(words.shape[1]) + words
        return torch.stack([starts, starts + 1], dim=2)

    def _padded_word_ids(self, examples) -> torch.Tensor:
        """The `word_ids` column as one [B, L] tensor (-1: special token or padding), padded as tokenizer.pad pads."""
        lengths = torch.tensor([len(example["input_ids"]) for example in examples])
        multiple = self.pad_to_multiple_of or 1
        length = -(-int(lengths.max()) // multiple) * multiple
        column = itertools.chain.from_iterable(example["word_ids"] for example in examples)
        words = torch.from_numpy(np.array(list(column), dtype=float)).nan_to_num(-1).long()  # None: NaN, then -1
        position = torch.arange(length)
        if self.tokenizer.padding_side == "left":
            real = position >= length - lengths[:, None]
        else:
            real = position < lengths[:, None]
        padded = torch.full((len(examples), length), -1)
        padded[real] = words  # row-major, as the column runs
        return padded

    def _continuation_flags(self) -> torch.Tensor:
        if self._continuation is None:
            model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
            prefix = getattr(model, "continuing_subword_prefix", None)
            if not prefix:
                raise ValueError("whole-word masking without a word_ids column needs a WordPiece tokenizer; add "
                                 "word_ids at tokenization: encoded['word_ids'] = [encoded.word_ids(i) ...]")
            flags = torch.zeros(len(self.tokenizer), dtype=torch.bool)
            for token, index in self.tokenizer.get_vocab().items():
                flags[index] = token.startswith(prefix)
            self._continuation = flags
        return self._continuation


# ----------------------------------------------------------------------------------------------- NSP pairs

_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "no", "fig", "cf", "approx"}
_SENTENCE_END = re.compile(r"""[.!?]+["')\]]*(?=\s+["'(\[]?[A-Z0-9])""")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences with a deterministic rule: a line break, or [.!?] then space then a capital or digit.

    No split after a common abbreviation ("e.g.", "Dr.") or a single-letter initial ("G. van Rossum").
    """
    sentences = []
    for line in text.splitlines():
        start = 0
        for match in _SENTENCE_END.finditer(line):
            last_word = line[start:match.start()].split()[-1:] or [""]
            last_word = last_word[0].strip("\"'([{").lower()
            if match.group().startswith(".") and (last_word in _ABBREVIATIONS or len(last_word) == 1):
                continue
            sentences.append(line[start:match.end()].strip())
            start = match.end()
        sentences.append(line[start:].strip())
    return [sentence for sentence in sentences if sentence]


def read_text_documents(path) -> list[str]:
    """Documents of a .txt file: blocks separated by one or more blank lines (paragraphs kept on their lines)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return [block.strip() for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _truncate_pair(tokens_a, tokens_b, max_tokens, rng):
    # From create_pretraining_data.py: trim the longer segment, from the front or the back at random.
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        del longer[0 if rng.random() < 0.5 else -1]


def _document_rng(seed, index):
    return random.Random(f"nsp:{seed}:{index}")  # string seeds hash with SHA-512: stable across processes


def _pairs_from_document(document, index, corpus, max_tokens, short_seq_prob, nsp_probability, rng):
    """BERT's create_instances_from_document for one document: yields (tokens_a, tokens_b, is_random_next)."""
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    chunk, chunk_length, i = [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [token for sentence in chunk[:a_end] for token in sentence]
            random_next = len(chunk) == 1 or rng.random() < nsp_probability
            tokens_b = _random_segment(corpus, index, target - len(tokens_a), rng) if random_next else None
            if tokens_b is not None:
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            elif len(chunk) >= 2:
                random_next = False
                tokens_b = [token for sentence in chunk[a_end:] for token in sentence]
            if tokens_b:
                _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                yield tokens_a, tokens_b, random_next
            chunk, chunk_length = [], 0
        i += 1


def _random_segment(corpus, own_index, target_length, rng, tries=10):
    """Consecutive sentences from a random other document of `corpus`, about `target_length` tokens; None if none."""
    if len(corpus) < 2:
        return None
    for _ in range(tries):
        other = rng.randrange(len(corpus) - 1)
        other += other >= own_index  # any document but this one
        sentences = corpus[other]
        if sentences:
            break
    else:
        return None
    segment = []
    for sentence in sentences[rng.randrange(len(sentences)):]:
        segment.extend(sentence)
        if len(segment) >= target_length:
            break
    return segment


def build_nsp_pairs(documents, max_seq_length, cls_token_id, sep_token_id, short_seq_prob=0.1,
                    nsp_probability=0.5, seed=0, first_index=0, corpus=None) -> dict[str, list]:
    """Next-sentence-prediction pairs `[CLS] A [SEP] B [SEP]` from tokenized documents (BERT's recipe).

    `documents`: a list of documents, each a list of sentences, each a list of token ids (no special tokens).
    Segment A is one or more consecutive sentences of a document; B is the actual continuation (label 0) or,
    with probability `nsp_probability` (and always when the chunk has a single sentence), consecutive sentences
    from another document (label 1). The target length is `max_seq_length - 3`, or with probability
    `short_seq_prob` a random length from 2; the longer segment is trimmed at a random end until the pair fits.

    Determinism: document k uses an RNG seeded from (`seed`, `first_index + k`), its index in the whole corpus.
    Random segments come from `corpus` (a sequence of documents indexed like `first_index + k`) when given:
    the pairs are then the same for any batching or number of processes. Without `corpus`, they come from
    `documents` only (a document of a single-document batch gets no random partner): results then depend on
    where batch boundaries fall.

    Returns unpadded columns `input_ids`, `token_type_ids`, `attention_mask` and `next_sentence_label`.
    """
    max_tokens = max_seq_length - 3
    if max_tokens < 2:
        raise ValueError(f"max_seq_length must be at least 5 to hold [CLS] A [SEP] B [SEP], got {max_seq_length}")
    pool, offset = (documents, 0) if corpus is None else (corpus, first_index)
    columns = {"input_ids": [], "token_type_ids": [], "attention_mask": [], "next_sentence_label": []}
    for k, document in enumerate(documents):
        document = [sentence for sentence in document if sentence]
        rng = _document_rng(seed, first_index + k)
        for tokens_a, tokens_b, random_next in _pairs_from_document(
                document, offset + k, pool, max_tokens, short_seq_prob, nsp_probability, rng):
            input_ids = [cls_token_id, *tokens_a, sep_token_id, *tokens_b, sep_token_id]
            columns["input_ids"].append(input_ids)
            columns["token_type_ids"].append([0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1))
            columns["attention_mask"].append([1] * len(input_ids))
            columns["next_sentence_label"].append(int(random_next))
    return columns


class _TokenizedCorpus:
    """Raw-text documents, split into sentences and tokenized on access (random partners of the NSP builder)."""

    def __init__(self, texts, tokenize):
        self.texts = texts
        # Small corpora draw the same partners again and again; large ones rarely repeat, so the cache stays bounded.
        self._tokenized = functools.lru_cache(maxsize=4096)(lambda index: tokenize(self.texts[index]))

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        return self._tokenized(index)


def nsp_pair_builder(tokenizer, max_seq_length, short_seq_prob=0.1, nsp_probability=0.5, seed=0, corpus=None,
                     text_column="text"):
    """A function for `dataset.map(fn, batched=True, with_indices=True, remove_columns=...)` on raw documents.

    One record per document (see `read_text_documents`). `corpus`: the whole text column being mapped (e.g.
    `dataset["text"]`), so random segments may come from any document and the pairs do not depend on
    `batch_size` or `num_proc`; without it they come from the batch (see `build_nsp_pairs`).
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UserError("next-sentence pairs need a tokenizer with [CLS] and [SEP] tokens: pass a --tokenizer_name "
                        "made for BERT (train_tokenizer.py --type wordpiece)")

    def tokenize(text):
        sentences = split_sentences(text or "")  # an empty CSV cell is an empty document
        if not sentences:
            return []
        return tokenizer(sentences, add_special_tokens=False, verbose=False)["input_ids"]

    pool = None if corpus is None else _TokenizedCorpus(corpus, tokenize)

    def build(examples, indices):
        documents = [tokenize(text) for text in examples[text_column]]
        return build_nsp_pairs(documents, max_seq_length, tokenizer.cls_token_id, tokenizer.sep_token_id,
                               short_seq_prob, nsp_probability, seed, first_index=indices[0], corpus=pool)

    return build


# ----------------------------------------------------------------------------------------------- PLM

@dataclasses.dataclass
class DataCollatorForPLM:
    """XLNet permutation LM batches: transformers' collator plus the padding it lacks.

    `DataCollatorForPermutationLanguageModeling` keeps only `input_ids`, pads them to the longest example (an odd
    length makes it raise) and returns no attention mask, so padded positions would be attended to. This pads
    to an even length on the tokenizer's side (left for XLNet), keeps `attention_mask` and `token_type_ids`, and
    hands the ids to the upstream masking (spans, `perm_mask`, `target_mapping`, labels; torch's global RNG).
    """

    tokenizer: Any
    plm_probability: float = 1 / 6
    max_span_length: int = 5

    def __post_init__(self):
        self._upstream = DataCollatorForPermutationLanguageModeling(
            self.tokenizer, plm_probability=self.plm_probability, max_span_length=self.max_span_length)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [{key: example[key] for key in ("input_ids", "attention_mask", "token_type_ids")
                     if key in example} for example in examples]
        batch = pad_without_fast_tokenizer_warning(self.tokenizer, examples, return_tensors="pt",
                                                   pad_to_multiple_of=2)
        input_ids, perm_mask, target_mapping, labels = self._upstream.torch_mask_tokens(batch["input_ids"].clone())
        batch.update(input_ids=input_ids, perm_mask=perm_mask, target_mapping=target_mapping, labels=labels)
        return dict(batch)
