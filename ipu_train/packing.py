"""Sequence packing: several short sequences in one row of `max_length` tokens, so that no compute goes to padding.

The packs come from shortest-pack-first histogram packing (SPFHP; Krell et al., 2021, "Efficient Sequence Packing
without Cross-contamination"): it works on the histogram of sequence lengths, not on the sequences, so its cost
depends on `max_length` and `max_per_pack` only. Lengths are taken longest first; the sequences of one length go,
as many at once as there are, into the open packs with the least room that still fits them (best fit), or start new
packs holding as many of them as fit (where the paper starts one pack per sequence). A pack closes when it is full or
holds `max_per_pack` sequences.
"""
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from .errors import UserError
from .pipeline.heads import IGNORE_INDEX


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
    the packs come from the sequences' lengths, so the same data gives the same rows (and exact resume)."""

    def __init__(self, sequences, max_length: int, max_per_pack: int, length_column: str = "input_ids"):
        self.sequences = sequences
        lengths = [len(ids) for ids in sequences[length_column]]
        self.packing = pack_sequences(lengths, max_length, max_per_pack)
        self.padded_efficiency = padded_efficiency(lengths, max_length)

    def __len__(self):
        return len(self.packing.packs)

    def __getitem__(self, index):
        return [self.sequences[i] for i in self.packing.packs[index]]


@dataclass
class DataCollatorForPackedSequences:
    """Rows of packed sequences, from a collator of single sequences (e.g. the capped MLM collator): each sequence is
    collated (masked, labelled) on its own, exactly as without packing, then laid into its row.

    A row's sequences see only themselves: `attention_mask` is additive and block-diagonal, [rows, 1, L, L] (0 where
    a token may attend, the dtype's minimum elsewhere; a padding token attends to itself alone, so no softmax row is
    empty), which transformers' SDPA and eager attention take as given. Position ids restart at each sequence (after
    `position_offset`, for families that count positions from the padding index); token type ids are each
    sequence's own. Per-sequence columns (`next_sentence_label`) become [rows, max_per_pack], -100 where a row holds
    fewer sequences, with `sequence_starts` (each sequence's first token: its [CLS]) beside them."""

    sequence_collator: Any
    max_length: int
    max_per_pack: int
    pad_token_id: int
    position_offset: int = 0
    per_sequence_columns: tuple = ("next_sentence_label",)

    def __call__(self, packs):
        flat = [sequence for pack in packs for sequence in pack]
        collated = self.sequence_collator(flat)
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
        sequence = lay_out(slot[:, None].expand_as(real), -1)
        batch["attention_mask"] = _block_diagonal_mask(sequence)
        if any(key in self.per_sequence_columns for key in collated):
            starts = torch.zeros(len(packs), self.max_per_pack, dtype=torch.long)
            starts[row, slot] = start
            batch["sequence_starts"] = starts
        return batch


def _block_diagonal_mask(sequence):
    """Additive [rows, 1, L, L] mask: token i attends to token j where both belong to the same sequence; a padding
    token (sequence -1) attends to itself only."""
    same = (sequence[:, :, None] == sequence[:, None, :]) & (sequence[:, :, None] >= 0)
    same |= torch.eye(sequence.shape[1], dtype=torch.bool)
    mask = torch.zeros(same.shape, dtype=torch.float32).masked_fill_(~same, torch.finfo(torch.float32).min)
    return mask[:, None]
