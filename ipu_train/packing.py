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

from .errors import UserError


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
