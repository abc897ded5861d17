"""Sequence packing: several short sequences in one row of `max_length` tokens, so that no compute goes to padding.

The packs come from shortest-pack-first histogram packing (SPFHP; Krell et al., 2021, "Efficient Sequence Packing
without Cross-contamination"): it works on the histogram of sequence lengths, not on the sequences, so its cost
depends on `max_length` and `max_per_pack` only. Lengths are taken longest first; the sequences of one length go,
as many at once as there are, into the open packs with the least room that still fits them (best fit), or start new
packs holding as many of them as fit (where the paper starts one pack per sequence). A pack closes when it is full or
holds `max_per_pack` sequences.
"""
import functools
import logging
import types
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import datasets
import numpy
import pyarrow.compute
import torch
import torch.nn.functional as F

from .attention import kernel_inputs_for, weights_dtype
from .errors import UserError
from .pipeline.heads import IGNORE_INDEX

logger = logging.getLogger("ipu_train")

# A packed sequence's index in its split, beside its columns: the collator masks sequences in the data's order.
SEQUENCE_INDEX = "packed_sequence_index"
# The collator's per-token record of packed rows, [rows, L] int32: each token's sequence in its row (1, 2, ...; 0 for
# padding). No model takes it: packed_model_inputs turns it into the attention mask, or the variable-length kernel's
# sequence bounds, on the device.
SEQUENCE_IN_ROW = "sequence_in_row"


@dataclass(frozen=True)
class Packing:
    packs: list  # one list of sequence indices per row, in the order the row holds them
    max_length: int
    real_tokens: int

    @property
    def efficiency(self) -> float:
        """Real tokens over the tokens of the rows: 1.0 when no row holds padding."""
        return self.real_tokens / (len(self.packs) * self.max_length) if self.packs else 1.0


def padded_efficiency(lengths, max_length) -> float:
    """Real tokens over row tokens with one sequence per row (no packing)."""
    return sum(lengths) / (len(lengths) * max_length) if lengths else 1.0


def pack_sequences(lengths, max_length: int, max_per_pack: int) -> Packing:
    """Rows of at most `max_length` tokens and `max_per_pack` sequences holding every sequence once; the same lengths
    give the same packs."""
    if max_per_pack < 1:
        raise UserError(f"--max_sequences_per_pack must be at least 1, got {max_per_pack}")
    too_long = [length for length in lengths if not 0 < length <= max_length]
    if too_long:
        raise UserError(f"a sequence of {too_long[0]} tokens cannot be packed into rows of {max_length}: lengths "
                        f"must lie in [1, --max_seq_length]")
    strategies = _histogram_strategies(Counter(lengths), max_length, max_per_pack)
    return Packing(_assign(strategies, lengths), max_length, sum(lengths))


def _histogram_strategies(histogram, max_length, max_per_pack):
    """Counter of pack strategies (tuples of lengths) -> how many packs follow each, by SPFHP."""
    open_packs = defaultdict(Counter)  # room left -> {strategy: packs}
    closed = Counter()

    def place(strategy, room, count):
        if room == 0 or len(strategy) == max_per_pack:
            closed[strategy] += count
        else:
            open_packs[room][strategy] += count

    for length in sorted(histogram, reverse=True):
        waiting = histogram[length]
        while waiting:
            fitting = [room for room, packs in open_packs.items() if room >= length and packs]
            if not fitting:  # new packs, each holding as many of this length as fit (first-fit decreasing does so)
                per_pack = min(max_per_pack, max_length // length)
                full, rest = divmod(waiting, per_pack)
                if full:
                    place((length,) * per_pack, max_length - per_pack * length, full)
                if rest:
                    place((length,) * rest, max_length - rest * length, 1)
                break
            room = min(fitting)
            strategy, count = next(iter(open_packs[room].items()))
            taken = min(count, waiting)
            open_packs[room][strategy] -= taken
            if not open_packs[room][strategy]:
                del open_packs[room][strategy]
            place(strategy + (length,), room - length, taken)
            waiting -= taken
    for packs in open_packs.values():
        closed.update(packs)
    return closed


def _assign(strategies, lengths):
    """Sequence indices per pack: each strategy's lengths filled with sequences of those lengths, in index order."""
    by_length = defaultdict(list)
    for index in sorted(range(len(lengths)), key=lambda i: -i):  # pop() then yields ascending indices
        by_length[lengths[index]].append(index)
    packs = []
    for strategy in sorted(strategies, key=lambda s: (-len(s), s)):  # a fixed order: the same lengths, the same rows
        for _ in range(strategies[strategy]):
            packs.append([by_length[length].pop() for length in strategy])
    packs.sort(key=lambda pack: pack[0])  # rows in the order of their first sequence, close to the data's order
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of sequences seen as packs: item i is the list of the sequences packed into row i. Nothing is copied;
    the packs come from the sequences' lengths, so the same data gives the same rows (and exact resume).

    Sequences saved already padded (pre-tokenized data with an `attention_mask` holding zeros, e.g. pairs padded to
    128) count their real tokens only, and each is handed over without its padding."""

    def __init__(self, sequences, max_length: int, max_per_pack: int, length_column: str = "input_ids"):
        self.sequences = sequences
        self.length_column = length_column
        self.lengths = _real_lengths(sequences, length_column)
        self.packing = pack_sequences(self.lengths, max_length, max_per_pack)
        self.padded_efficiency = padded_efficiency(self.lengths, max_length)

    def __len__(self):
        return len(self.packing.packs)

    def __getitem__(self, index):
        return [dict(self._unpadded(i), **{SEQUENCE_INDEX: i}) for i in self.packing.packs[index]]

    def _unpadded(self, i):
        sequence = self.sequences[i]
        width, length = len(sequence[self.length_column]), self.lengths[i]
        if width == length:
            return sequence
        if "attention_mask" in sequence and sum(sequence["attention_mask"][:length]) != length:
            raise UserError(f"sequence {i} of the data is padded on the left (or inside): packing takes sequences "
                            "padded on the right, or not padded; drop --pack_sequences for this data")
        return {key: value[:length] if isinstance(value, list) and len(value) == width else value
                for key, value in sequence.items()}


def _real_lengths(sequences, length_column):
    """Tokens per sequence: the attention mask's ones where there is one (padding is no token), else the length of
    `length_column`. Read from Arrow in one pass for a `datasets.Dataset`: no row becomes Python objects."""
    column = "attention_mask" if "attention_mask" in _columns(sequences) else length_column
    if isinstance(sequences, datasets.Dataset):
        values = sequences.with_format("arrow")[column]
        if column == "attention_mask":
            return _mask_sums(values)
        return pyarrow.compute.list_value_length(values).to_pylist()
    return [sum(mask) if column == "attention_mask" else len(mask) for mask in sequences[column]]


def _columns(sequences):
    return sequences.column_names if isinstance(sequences, datasets.Dataset) else list(sequences)


def _mask_sums(masks):
    """Per-row sums of an Arrow list column of 0/1 values, chunk by chunk (a large split is never copied whole)."""
    sums = []
    for chunk in masks.chunks if isinstance(masks, pyarrow.ChunkedArray) else [masks]:
        rows = pyarrow.compute.list_parent_indices(chunk).to_numpy()
        sums += numpy.bincount(rows, weights=chunk.flatten().to_numpy(), minlength=len(chunk)).astype(int).tolist()
    return sums


def pack_split(sequences, split, max_length: int, max_per_pack: int) -> PackedDataset:
    """The sequences of one split as packed rows, with the efficiency before and after packing logged once."""
    packed = PackedDataset(sequences, max_length, max_per_pack)
    logger.info("Packing the %s split: %d sequences into %d rows of %d tokens (at most %d per row); real tokens / "
                "row tokens: %.3f one sequence per row, %.3f packed", split, len(packed.lengths), len(packed),
                max_length, max_per_pack, packed.padded_efficiency, packed.packing.efficiency)
    return packed


@dataclass
class DataCollatorForPackedSequences:
    """Rows of packed sequences, from a collator of single sequences (e.g. the capped MLM collator): each sequence is
    collated (masked, labelled) on its own, exactly as without packing, then laid into its row. The batch's
    sequences go to the sequence collator as one batch, in the data's order, and each column's real tokens then
    reach their rows by one gather and one scatter (tests/test_packing_collator.py holds the batches equal to the
    collator's before it worked so; benchmarks/packing.py --collate_against times the two).

    A row's sequences see only themselves. The batch holds no attention mask: `sequence_in_row` (SEQUENCE_IN_ROW,
    [rows, L] int32) numbers each token's sequence in its row (1, 2, ...; 0 for padding), and `packed_model_inputs`
    builds the [rows, 1, L, L] block-diagonal mask from it on the device, right before the forward (an L x L mask
    per row is 1 MiB at 512 in float32: too much to build on the host and copy every step). Position ids restart
    at each sequence (after `position_offset`, for families that count positions from the padding index); token
    type ids are each sequence's own. Per-sequence columns (`next_sentence_label`) become [rows, max_per_pack], -100
    where a row holds fewer sequences, with `sequence_starts` (each sequence's first token: its [CLS]) beside
    them."""

    sequence_collator: Any
    max_length: int
    max_per_pack: int
    pad_token_id: int
    position_offset: int = 0
    per_sequence_columns: tuple = ("next_sentence_label",)

    @property
    def max_masked_tokens(self):
        """The masked-token cap of a row, which the sparse MLM head gathers (the trainer reads it as it reads the
        MLM collator's): each sequence is capped on its own at c tokens, and a row holds at most `max_per_pack`
        sequences and `max_length` tokens, so min(max_length, max_per_pack x c) is never exceeded and no masked token
        is dropped. None (no cap: exact, dynamic shapes) where the sequences are not capped."""
        cap_for = getattr(self.sequence_collator, "cap_for", None)
        cap = cap_for(self.max_length) if cap_for is not None else None
        return None if cap is None else min(self.max_length, self.max_per_pack * cap)

    def __call__(self, packs):
        flat = [sequence for pack in packs for sequence in pack]
        order = sorted(range(len(flat)), key=lambda k: flat[k].get(SEQUENCE_INDEX, k))
        collated = self._collated(flat, order)
        # Each collated sequence's row, place in its row (slot) and first column there, in the collator's order.
        row, slot, start = [], [], []
        for r, pack in enumerate(packs):
            column = 0
            for k, sequence in enumerate(pack):
                row.append(r)
                slot.append(k)
                start.append(column)
                column += len(sequence["input_ids"])
        row, slot, start = (torch.tensor(values)[order] for values in (row, slot, start))
        sequences, width = collated["input_ids"].shape
        lengths = torch.tensor([len(flat[k]["input_ids"]) for k in order]).clamp(max=width)
        # The real tokens (each sequence's first `length` columns), as indices into the collated [sequences, width]
        # tensors and into the [rows, max_length] rows, in the same order: one gather and one scatter per column.
        source = (torch.arange(width) < lengths[:, None]).view(-1).nonzero().squeeze(1)
        target = source + torch.repeat_interleave(row * self.max_length + start - torch.arange(sequences) * width,
                                                  lengths)

        def lay_out(values, fill, gathered=False):
            """[rows, max_length, ...] of `fill` holding `values` ([sequences, width, ...], or its real tokens
            where `gathered`) at the sequences' places."""
            tokens = values if gathered else values.flatten(0, 1).index_select(0, source)
            rows = torch.full((len(packs) * self.max_length, *tokens.shape[1:]), fill, dtype=values.dtype)
            return rows.index_copy_(0, target, tokens).view(len(packs), self.max_length, *tokens.shape[1:])

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
            elif key != "attention_mask" and torch.is_tensor(values) and values.shape[:2] == (sequences, width):
                batch[key] = lay_out(values, 0)
        positions = source % width + self.position_offset  # each sequence's own, from its first token
        batch["position_ids"] = lay_out(positions, self.position_offset, gathered=True)
        batch[SEQUENCE_IN_ROW] = lay_out(torch.repeat_interleave((slot + 1).to(torch.int32), lengths), 0,
                                         gathered=True)
        if any(key in self.per_sequence_columns for key in collated):
            starts = torch.zeros(len(packs), self.max_per_pack, dtype=torch.long)
            starts[row, slot] = start
            batch["sequence_starts"] = starts
        return batch

    def _collated(self, flat, order):
        """The sequence collator's batch for the sequences `flat[k] for k in order`: sorted into the data's order
        (where PackedDataset says it), so that the same sequences in one batch get the same random masks, packed
        or not. Its rows stay in that order: the layout into packed rows follows `order`."""
        return self.sequence_collator([{key: value for key, value in flat[k].items() if key != SEQUENCE_INDEX}
                                       for k in order])


def packed_model_inputs(batch, model):
    """The keyword arguments `model` takes for `batch`: a batch of packed rows (one holding SEQUENCE_IN_ROW) gets,
    in place of SEQUENCE_IN_ROW, the variable-length kernel's sequence bounds where the kernel can run (a model
    routed by ipu_train.attention, on CUDA, in bf16 or fp16), and otherwise its block-diagonal attention mask, in
    the model's dtype; either is built where the batch lies (on the device). Any other batch is returned as it is.
    Every path that runs a model on packed rows calls this right before the forward, inside its autocast:
    TorchBackend's training step, compile step and evaluation, benchmarks/packing.py and the tests. No host read."""
    sequence_in_row = batch.get(SEQUENCE_IN_ROW)
    if sequence_in_row is None:
        return batch
    inputs = {key: value for key, value in batch.items() if key != SEQUENCE_IN_ROW}
    kernel = kernel_inputs_for(model, sequence_in_row)
    if kernel is not None:
        inputs.update(kernel)
    else:
        inputs["attention_mask"] = block_diagonal_mask(sequence_in_row, weights_dtype(model))
    return inputs


def block_diagonal_mask(sequence_in_row, dtype):
    """Additive [rows, 1, L, L] mask from each token's sequence in its row ([rows, L], 0 for padding): 0 where token
    i may attend to token j (both of one sequence), the dtype's minimum elsewhere, which transformers' SDPA and eager
    attention take as given. A padding token attends to itself alone, so that no softmax row is empty."""
    length, device = sequence_in_row.shape[1], sequence_in_row.device
    alone = -1 - torch.arange(length, device=device)  # each padding token a sequence of its own
    sequence = torch.where(sequence_in_row > 0, sequence_in_row, alone)
    same = sequence[:, None, :, None] == sequence[:, None, None, :]
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill_(~same, torch.finfo(dtype).min)


def refuse_unconverted_packed_rows(model):
    """Make `model` raise when called on a batch that still holds SEQUENCE_IN_ROW: transformers' models take unknown
    keyword arguments without a word (**kwargs), so a path that skipped packed_model_inputs would otherwise run
    without any attention mask, each sequence attending to every other one of its row. Once per model."""
    if not getattr(model, "_refuses_unconverted_packed_rows", False):
        model.register_forward_pre_hook(_refuse_sequence_in_row, with_kwargs=True)
        model._refuses_unconverted_packed_rows = True


def _refuse_sequence_in_row(module, args, kwargs):
    if SEQUENCE_IN_ROW in kwargs:
        raise RuntimeError(f"{type(module).__name__} was given a batch of packed rows as the collator made it: pass it "
                           "through ipu_train.packing.packed_model_inputs first, which builds its attention mask")


def accept_packed_pretraining_rows(model):
    """Let a BERT pretraining model (`BertForPreTraining`) evaluate packed rows: given `sequence_starts`, its forward
    predicts next-sentence relations at each packed sequence's [CLS], [rows, sequences, 2], and its loss is the MLM
    loss over the masked tokens plus the NSP loss over the sequences, as on one sequence per row. Training forwards
    with the serialized heads read `sequence_starts` themselves (families.py); this instance's forward is replaced,
    its weights and state dict untouched."""
    unpacked_forward = model.forward.__func__  # called on `self`: a deep copy of the model runs on its own weights

    @functools.wraps(unpacked_forward)  # its signature: the trainer reads the label names and columns from it
    def forward(self, *args, sequence_starts=None, **kwargs):
        if sequence_starts is None:
            return unpacked_forward(self, *args, **kwargs)
        return _packed_pretraining_forward(self, sequence_starts, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


def _packed_pretraining_forward(model, sequence_starts, input_ids=None, attention_mask=None, token_type_ids=None,
                                position_ids=None, inputs_embeds=None, labels=None, next_sentence_label=None,
                                return_dict=None, **kwargs):
    from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

    from .pipeline.families import _pooled_at

    outputs = model.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                         position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
    prediction_logits = model.cls.predictions(outputs.last_hidden_state)
    nsp_logits = model.cls.seq_relationship(_pooled_at(model.bert.pooler, outputs, sequence_starts))
    loss = None
    if labels is not None and next_sentence_label is not None:
        loss = (F.cross_entropy(prediction_logits.view(-1, prediction_logits.shape[-1]), labels.view(-1))
                + F.cross_entropy(nsp_logits.view(-1, 2), next_sentence_label.view(-1)))
    output = BertForPreTrainingOutput(loss=loss, prediction_logits=prediction_logits,
                                      seq_relationship_logits=nsp_logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)
    return output if return_dict is not False else output.to_tuple()
