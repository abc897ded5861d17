"""The packed collator's batches are, bit for bit, what it gave before its fast path (issue 15, point 4): the same
keys in the same order, dtypes and values (input ids after masking, labels, token type ids, sequence_in_row,
position ids, next-sentence labels, sequence starts) for the same packs and the same seed.

The reference is the collator as of commit e081b82, kept here (`ReferencePackedCollator`), around the MLM collator
that pads every batch with `tokenizer.pad` (`PreviousCollator`, benchmarks/collate.py, which
tests/test_collator_fast.py holds equal to DataCollatorForCappedMLM): the per-sequence collation, the random stream
and the layout into rows all come from code that the fast path does not run."""
import dataclasses
import itertools
import random

import datasets
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorForTokenClassification

from ipu_train.data import DataCollatorForCappedMLM
from ipu_train.packing import SEQUENCE_IN_ROW, SEQUENCE_INDEX, DataCollatorForPackedSequences, PackedDataset
from ipu_train.pipeline.heads import IGNORE_INDEX

from .test_collator_fast import PreviousCollator, word_ids


@dataclasses.dataclass
class ReferencePackedCollator(DataCollatorForPackedSequences):
    """DataCollatorForPackedSequences.__call__ and _collated_in_data_order as of commit e081b82, unchanged."""

    def __call__(self, packs):
        flat = [sequence for pack in packs for sequence in pack]
        collated = self._collated_in_data_order(flat)
        lengths = torch.tensor([len(sequence["input_ids"]) for sequence in flat])
        row = torch.tensor([r for r, pack in enumerate(packs) for _ in pack])
        slot = torch.tensor([k for pack in packs for k in range(len(pack))])  # a sequence's place in its row
        start = torch.tensor([sum(len(s["input_ids"]) for s in pack[:k]) for pack in packs for k in range(len(pack))])
        width = collated["input_ids"].shape[1]
        real = torch.arange(width) < lengths[:, None]  # [sequences, width]: the tokens of each sequence
        target_row = row[:, None].expand(-1, width)[real]
        target_column = (start[:, None] + torch.arange(width))[real]

        def lay_out(values, fill):
            rows = torch.full((len(packs), self.max_length), fill, dtype=values.dtype)
            rows[target_row, target_column] = values[real]
            return rows

        batch = {}
        for key, values in collated.items():
            if key in self.per_sequence_columns:
                per_row = torch.full((len(packs), self.max_per_pack), IGNORE_INDEX, dtype=values.dtype)
                per_row[row, slot] = values
                batch[key] = per_row
            elif key == "input_ids":
                batch[key] = lay_out(values, self.pad_token_id)
            elif key == "labels":
                batch[key] = lay_out(values, IGNORE_INDEX)
            elif key != "attention_mask" and torch.is_tensor(values) and values.shape[:2] == real.shape:
                batch[key] = lay_out(values, 0)
        positions = torch.arange(width).expand_as(real) + self.position_offset
        batch["position_ids"] = lay_out(positions, self.position_offset)
        batch[SEQUENCE_IN_ROW] = lay_out((slot + 1).to(torch.int32)[:, None].expand_as(real), 0)
        if any(key in self.per_sequence_columns for key in collated):
            starts = torch.zeros(len(packs), self.max_per_pack, dtype=torch.long)
            starts[row, slot] = start
            batch["sequence_starts"] = starts
        return batch

    def _collated_in_data_order(self, flat):
        order = sorted(range(len(flat)), key=lambda k: flat[k].get(SEQUENCE_INDEX, k))
        collated = self.sequence_collator([{key: value for key, value in flat[k].items() if key != SEQUENCE_INDEX}
                                           for k in order])
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        return {key: values[back] if torch.is_tensor(values) and values.shape[:1] == back.shape else values
                for key, values in collated.items()}


@pytest.fixture(scope="module", params=["wordpiece_tokenizer_dir", "roberta_tokenizer_dir"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))


def sequences(tokenizer, count, shortest, longest, columns, rng):
    """Sequences of random lengths as a dataset's rows hand them over (dicts of Python lists and ints): [CLS] ids
    [SEP] ids [SEP], now and then a special id inside; pairs' token type ids and next-sentence labels, the
    attention mask, word ids and the special-token mask where `columns` asks."""
    first_plain = max(tokenizer.all_special_ids) + 1
    rows = []
    for _ in range(count):
        length = rng.randint(shortest, longest)
        ids = [rng.randrange(first_plain, len(tokenizer)) for _ in range(length)]
        for k in range(length):
            if rng.random() < 0.02:
                ids[k] = rng.choice(tokenizer.all_special_ids)
        cut = rng.randint(1, length - 2) if length > 3 else 1
        ids[0], ids[cut], ids[-1] = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.sep_token_id
        row = {"input_ids": ids}
        if "pair" in columns:
            row["token_type_ids"] = [0] * (cut + 1) + [1] * (length - cut - 1)
        if "attention_mask" in columns:
            row["attention_mask"] = [1] * length
        if "pair" in columns:
            row["next_sentence_label"] = rng.randint(0, 1)
        if "word_ids" in columns:
            row["word_ids"] = word_ids(length, torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        if "special_tokens_mask" in columns:
            row["special_tokens_mask"] = [int(i in (0, cut, length - 1)) for i in range(length)]
        rows.append(row)
    return rows


def packed_batches(rows, max_length, max_per_pack, batch_rows, as_dataset):
    """The packs of `rows` as PackedDataset hands them over (with each sequence's index in the data), cut into
    batches of `batch_rows` packed rows, the rows shuffled as a random sampler would."""
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    if as_dataset:  # rows read back from Arrow
        packed = PackedDataset(datasets.Dataset.from_dict(columns), max_length, max_per_pack)
        packs = [packed[i] for i in range(len(packed))]
    else:  # the rows themselves, with their index as PackedDataset adds it
        packs = [[dict(rows[i], **{SEQUENCE_INDEX: i}) for i in pack]
                 for pack in PackedDataset(columns, max_length, max_per_pack).packing.packs]
    random.Random(len(rows)).shuffle(packs)
    return [packs[at:at + batch_rows] for at in range(0, len(packs), batch_rows)]


def assert_same_batch(got, expected):
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert got[key].shape == expected[key].shape, key
        assert torch.equal(got[key], expected[key]), key


def assert_collators_agree(make_sequence_collator, reference_sequence_collator, batches, max_length, max_per_pack,
                           pad_token_id, position_offset=0, seed=0):
    """Both packed collators on the same batches, one after the other from the same global RNG state."""
    options = dict(max_length=max_length, max_per_pack=max_per_pack, pad_token_id=pad_token_id,
                   position_offset=position_offset)
    current = DataCollatorForPackedSequences(make_sequence_collator(), **options)
    reference = ReferencePackedCollator(reference_sequence_collator(), **options)
    for k, packs in enumerate(batches):  # the collators' generators (with a seed) run on from batch to batch
        torch.manual_seed(seed + k)
        expected = reference(packs)
        torch.manual_seed(seed + k)
        assert_same_batch(current(packs), expected)
    assert current.max_masked_tokens == reference.max_masked_tokens


COLUMN_SETS = [("pair", "attention_mask"), ("pair",), ("attention_mask", "word_ids"),
               ("pair", "word_ids", "special_tokens_mask"), ("special_tokens_mask",)]


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_packed_batches_are_the_reference_collators(tokenizer, whole_word_mask):
    rng = random.Random(0)
    column_sets = COLUMN_SETS
    if whole_word_mask and tokenizer.cls_token != "[CLS]":  # byte-level BPE: words come from word_ids only
        column_sets = [columns for columns in column_sets if "word_ids" in columns]
    cases = itertools.product(column_sets, [None, "auto", 3], [None, 8], [(64, 3), (128, 8), (40, 1)])
    for trial, (columns, cap, multiple, (max_length, max_per_pack)) in enumerate(cases):
        rows = sequences(tokenizer, 48, 2, max_length, columns, rng)
        batches = packed_batches(rows, max_length, max_per_pack, batch_rows=[7, 16][trial % 2],
                                 as_dataset=trial % 3 == 0)
        options = dict(mlm_probability=[0.15, 0.5][trial // 2 % 2], max_masked_tokens=cap,
                       pad_to_multiple_of=multiple, whole_word_mask=whole_word_mask)
        if trial % 3 == 1:
            options["seed"] = trial
        assert_collators_agree(lambda: DataCollatorForCappedMLM(tokenizer, **options),
                               lambda: PreviousCollator(tokenizer, **options), batches, max_length, max_per_pack,
                               tokenizer.pad_token_id, position_offset=[0, tokenizer.pad_token_id + 1][trial % 2],
                               seed=trial)


def test_long_rows_of_bert_pairs_as_pretraining_packs_them(wordpiece_tokenizer_dir):
    """Batches of 64 rows of 512 holding up to 3 pairs each, capped and padded to a multiple of 8 as
    run_pretraining.py collates them, and the same uncapped (its evaluation collator)."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    rows = sequences(tokenizer, 400, 20, 512, ("pair", "attention_mask"), random.Random(1))
    batches = packed_batches(rows, 512, 3, batch_rows=64, as_dataset=True)
    for cap in ("auto", None):
        options = dict(mlm_probability=0.15, max_masked_tokens=cap, pad_to_multiple_of=8)
        assert_collators_agree(lambda: DataCollatorForCappedMLM(tokenizer, **options),
                               lambda: PreviousCollator(tokenizer, **options), batches, 512, 3,
                               tokenizer.pad_token_id)


def test_packs_without_sequence_indices_and_pairs_saved_padded(wordpiece_tokenizer_dir):
    """Packs given as plain lists of sequences (no index in the data: collated in the packs' order), and pairs saved
    padded to 64, which PackedDataset hands over without their padding."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    rng = random.Random(2)
    rows = sequences(tokenizer, 30, 3, 40, ("pair", "attention_mask"), rng)
    plain = [[rows[i] for i in range(at, min(at + rng.randint(1, 3), len(rows)))] for at in range(0, len(rows), 3)]
    padded = [{key: value + [{"input_ids": tokenizer.pad_token_id}.get(key, 0)] * (64 - len(row["input_ids"]))
               if isinstance(value, list) else value for key, value in row.items()} for row in rows]
    saved = packed_batches(padded, 128, 3, batch_rows=4, as_dataset=True)
    assert any(SEQUENCE_INDEX in sequence for packs in saved for pack in packs for sequence in pack)
    options = dict(mlm_probability=0.3, max_masked_tokens="auto", pad_to_multiple_of=8, seed=3)
    for batches in ([plain[:6], plain[6:]], saved):
        assert_collators_agree(lambda: DataCollatorForCappedMLM(tokenizer, **options),
                               lambda: PreviousCollator(tokenizer, **options), batches, 128, 3,
                               tokenizer.pad_token_id)


@pytest.mark.parametrize("sequence_collator", ["token classification", "mlm off"])
def test_other_sequence_collators_are_laid_out_as_before(wordpiece_tokenizer_dir, sequence_collator):
    """A sequence collator other than the MLM one (run_pretraining.py's pre-labelled data, MLM off) is called as
    before and its columns laid out as before."""
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_tokenizer_dir)
    rng = random.Random(3)
    rows = sequences(tokenizer, 40, 3, 60, ("pair", "attention_mask"), rng)
    if sequence_collator == "token classification":
        for row in rows:
            row["labels"] = [rng.choice([IGNORE_INDEX, rng.randrange(len(tokenizer))]) for _ in row["input_ids"]]
        make = lambda: DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)  # noqa: E731
        reference = make
    else:
        make = lambda: DataCollatorForCappedMLM(tokenizer, mlm=False)  # noqa: E731
        reference = lambda: PreviousCollator(tokenizer, mlm=False)  # noqa: E731
    assert_collators_agree(make, reference, packed_batches(rows, 128, 3, batch_rows=5, as_dataset=False), 128, 3,
                           tokenizer.pad_token_id)
