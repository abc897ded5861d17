"""DataCollatorForCappedMLM's fast paths (one conversion per column where no row needs padding, the special-token mask
by torch.isin) give exactly what the previous collator gave: the same batches, and the same masks for a seed."""
import copy
import importlib.util
import itertools
import pathlib

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BatchEncoding

from ipu_train.data import DataCollatorForCappedMLM

_spec = importlib.util.spec_from_file_location(
    "benchmark_collate", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "collate.py")
_collate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_collate)
PreviousCollator = _collate.PreviousCollator  # the collator before the fast paths


@pytest.fixture(scope="module", params=["wordpiece_tokenizer_dir", "roberta_tokenizer_dir"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def word_ids(length, generator):
    """None, words of 1-3 pieces, None."""
    sizes = torch.randint(1, 4, (length,), generator=generator).tolist()
    words = [word for word, size in enumerate(sizes) for _ in range(size)][:length - 2]
    return [None, *words, None]


def examples(tokenizer, generator, rows, max_len, full, columns):
    """Rows of random ids between the tokenizer's first and last special tokens, now and then a special id inside
    (which the special-token mask must find anywhere); all `max_len` long if `full`, else of random lengths."""
    first_plain = max(tokenizer.all_special_ids) + 1
    batch = []
    for _ in range(rows):
        length = max_len if full else int(torch.randint(2, max_len + 1, (1,), generator=generator))
        ids = torch.randint(first_plain, len(tokenizer), (length,), generator=generator)
        inside = torch.rand(length, generator=generator) < 0.02
        ids[inside] = torch.tensor(tokenizer.all_special_ids)[torch.randint(0, 5, (int(inside.sum()),),
                                                                            generator=generator)]
        ids[0], ids[-1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        example = {"input_ids": ids.tolist(), "attention_mask": [1] * length}
        words = word_ids(length, generator)
        if "word_ids" in columns:
            example["word_ids"] = words
        if "special_tokens_mask" in columns:
            example["special_tokens_mask"] = [int(word is None) for word in words]
        if "pair" in columns:
            example["token_type_ids"] = [0] * (length // 2) + [1] * (length - length // 2)
            example["next_sentence_label"] = int(torch.randint(0, 2, (1,), generator=generator))
        batch.append(example)
    return batch


def assert_same_batch(got, expected):
    assert type(got) is type(expected)
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_masks_for_a_seed_are_the_previous_collators(tokenizer, whole_word_mask):
    generator = torch.Generator().manual_seed(0)
    column_sets = [("pair",), ("word_ids",), ("word_ids", "special_tokens_mask", "pair"), ("special_tokens_mask",)]
    if whole_word_mask and tokenizer.cls_token != "[CLS]":  # byte-level BPE: words come from word_ids only
        column_sets = [columns for columns in column_sets if "word_ids" in columns]
    cases = itertools.product(column_sets, [None, "auto", 5], [True, False], [(16, 128), (5, 40), (3, 512)])
    for trial, (columns, cap, full, (rows, max_len)) in enumerate(cases):
        batch = examples(tokenizer, generator, rows, max_len, full, columns)
        options = dict(mlm_probability=[0.15, 0.5][trial % 2], max_masked_tokens=cap,
                       pad_to_multiple_of=[None, 8][trial // 2 % 2], whole_word_mask=whole_word_mask)
        if trial % 3:
            options["seed"] = trial
        previous, current = PreviousCollator(tokenizer, **options), DataCollatorForCappedMLM(tokenizer, **options)
        for _ in range(2):  # the generators run on from call to call
            torch.manual_seed(trial)
            expected = previous(batch)
            torch.manual_seed(trial)
            assert_same_batch(current(batch), expected)


def test_lists_of_ids_and_mlm_off_are_the_previous_collators(wordpiece_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    batch = examples(tokenizer, torch.Generator().manual_seed(1), 8, 64, False, ("word_ids",))
    for options, rows in [(dict(whole_word_mask=True, seed=1), [e["input_ids"] for e in batch]),
                          (dict(max_masked_tokens=4, seed=1), [e["input_ids"] for e in batch]),
                          (dict(mlm=False), batch)]:
        expected = PreviousCollator(tokenizer, **options)(rows)
        assert_same_batch(DataCollatorForCappedMLM(tokenizer, **options)(rows), expected)


def test_worker_processes_seed_as_before(wordpiece_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    rows = examples(tokenizer, torch.Generator().manual_seed(2), 64, 32, True, ("pair",))
    batches = {}
    for collator in (PreviousCollator, DataCollatorForCappedMLM):
        loader = torch.utils.data.DataLoader(rows, batch_size=8, num_workers=2,
                                             collate_fn=collator(tokenizer, max_masked_tokens=3, seed=7))
        batches[collator] = list(loader)
    for got, expected in zip(batches[DataCollatorForCappedMLM], batches[PreviousCollator], strict=True):
        assert_same_batch(got, expected)


def stacked_and_padded(tokenizer, rows, pad_to_multiple_of=None):
    collator = DataCollatorForCappedMLM(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    padded = tokenizer.pad([dict(row) for row in rows], return_tensors="pt", pad_to_multiple_of=pad_to_multiple_of)
    return collator._padded(rows), padded


@pytest.mark.parametrize("make_row", [
    lambda i: {"input_ids": [2, i, 3], "token_type_ids": [0, 0, 1], "attention_mask": [1, 1, 1]},
    lambda i: {"input_ids": [2, i, i, 3], "next_sentence_label": i % 2, "weight": 0.5 * i, "flag": bool(i % 2)},
    lambda i: {"input_ids": [2, i, 3], "special_tokens_mask": [True, False, True], "score": [0.1, 0.2, 0.3]},
    lambda i: {"input_ids": np.array([2, i, 3], np.int32), "attention_mask": np.ones(3, np.uint8)},
    lambda i: {"input_ids": torch.tensor([2, i, 3], dtype=torch.int32), "next_sentence_label": torch.tensor(i)},
    lambda i: {"input_ids": [2, i, 3], "offset_mapping": np.zeros((3, 2), np.int32), "label": np.float16(i)},
], ids=["pairs", "scalars", "floats", "arrays", "tensors", "arrays beside lists"])
def test_stacking_equals_tokenizer_pad(tokenizer, make_row):
    stacked, padded = stacked_and_padded(tokenizer, [make_row(i) for i in range(5, 9)])
    assert isinstance(stacked, BatchEncoding)
    assert_same_batch(stacked, padded)


def ragged(i, length):
    """`length` ids: 2, then `i`s, then 3."""
    return [2, *[i] * (length - 2), 3]


PADDED_ROWS = {  # rows the collator pads itself, in every case
    "pairs": lambda i, n: {"input_ids": ragged(i, n), "token_type_ids": [0] * (n - 1) + [1],
                           "attention_mask": [1] * n},
    "scalars": lambda i, n: {"input_ids": ragged(i, n), "next_sentence_label": i % 2, "weight": 0.5 * i,
                             "flag": bool(i % 2), "label": np.float16(i)},
    "bool masks": lambda i, n: {"input_ids": ragged(i, n), "attention_mask": [True] * n,
                                "special_tokens_mask": [True] + [False] * (n - 2) + [True]},
    "ints and bools": lambda i, n: {"input_ids": ragged(i, n), "special_tokens_mask": [1] + [False] * (n - 2) + [1]},
}
LEFT_TO_TOKENIZER_PAD = {  # rows it leaves to tokenizer.pad where they need padding (which may refuse them)
    "per-token floats": lambda i, n: {"input_ids": ragged(i, n), "score": [0.5] * n},
    "float mask": lambda i, n: {"input_ids": ragged(i, n), "attention_mask": [1.0] * n},
    "arrays": lambda i, n: {"input_ids": np.array(ragged(i, n), np.int32), "attention_mask": np.ones(n, np.uint8)},
    "tuples": lambda i, n: {"input_ids": tuple(ragged(i, n))},
    "offsets beside lists": lambda i, n: {"input_ids": ragged(i, n), "offset_mapping": np.zeros((n, 2), np.int32)},
    "text": lambda i, n: {"input_ids": ragged(i, n), "text": "a b"},
    "a short mask": lambda i, n: {"input_ids": ragged(i, n), "attention_mask": [1] * (n - 1)},
}


@pytest.mark.parametrize("lengths, pad_to_multiple_of", [([3, 5, 4, 5], None), ([3, 5, 4, 5], 8), ([4, 4], 8)],
                         ids=["longest", "multiple", "equal lengths to a multiple"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("case", [*PADDED_ROWS, *LEFT_TO_TOKENIZER_PAD])
def test_padding_equals_tokenizer_pad(tokenizer, case, lengths, pad_to_multiple_of, padding_side):
    """Rows to pad: the collator pads ids, token types and masks as tokenizer.pad does, on its padding side, and
    leaves to tokenizer.pad what it cannot pad the same way."""
    tokenizer = copy.copy(tokenizer)
    tokenizer.padding_side = padding_side
    make_row = {**PADDED_ROWS, **LEFT_TO_TOKENIZER_PAD}[case]
    rows = [make_row(5 + i, n) for i, n in enumerate(lengths)]
    collator = DataCollatorForCappedMLM(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    padded = collator._padded(rows)
    if case in PADDED_ROWS:
        assert padded is not None
    elif len(set(lengths)) > 1:
        assert padded is None
    try:
        expected = tokenizer.pad([dict(row) for row in rows], return_tensors="pt",
                                 pad_to_multiple_of=pad_to_multiple_of)
    except (ValueError, TypeError, RuntimeError):
        assert padded is None
        return
    if padded is not None:
        assert isinstance(padded, BatchEncoding)
        assert_same_batch(padded, expected)


def test_rows_of_unknown_padding_are_left_to_tokenizer_pad(wordpiece_tokenizer_dir):
    """A tokenizer whose first input is not input_ids, or whose model takes no attention mask (tokenizer.pad then
    leaves a given mask unpadded), pads its own way."""
    rows = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [2, 3], "attention_mask": [1, 1]}]
    for model_input_names in (["input_values", "input_ids"], ["input_ids", "token_type_ids"]):
        tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir, model_input_names=model_input_names)
        assert DataCollatorForCappedMLM(tokenizer)._padded(rows) is None


def test_an_empty_row_is_padded_as_tokenizer_pad_pads_it(tokenizer):
    rows = [{"input_ids": [2, 7, 3], "token_type_ids": [0, 0, 1], "next_sentence_label": 1},
            {"input_ids": [], "token_type_ids": [], "next_sentence_label": 0}]
    expected = tokenizer.pad([dict(row) for row in rows], return_tensors="pt", pad_to_multiple_of=4)
    assert_same_batch(DataCollatorForCappedMLM(tokenizer, pad_to_multiple_of=4)._padded(rows), expected)
    assert DataCollatorForCappedMLM(tokenizer)._padded([rows[1]]) is None  # no token at all: tokenizer.pad's case


def test_special_tokens_are_found_at_any_id(tokenizer):
    """The lookup of special ids gives torch.isin's answer, also for ids beyond the vocabulary and other dtypes."""
    collator = DataCollatorForCappedMLM(tokenizer)
    special = torch.tensor(tokenizer.all_special_ids)
    ids = torch.cat([special, torch.arange(len(tokenizer) + 3)]).reshape(1, -1)
    for inputs in (ids, ids.int(), ids[:, :len(special) + 50].to(torch.uint8), ids - 1, ids[:, :0]):
        assert torch.equal(collator._special_tokens(inputs), torch.isin(inputs, special))
