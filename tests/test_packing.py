import random

import pytest

from ipu_train.errors import UserError
from ipu_train.packing import pack_sequences, padded_efficiency


def first_fit_decreasing(lengths, max_length, max_per_pack):
    """The classic bin-packing heuristic, sequence by sequence: the reference SPFHP must match or beat."""
    bins = []  # [room left, sequences]
    for length in sorted(lengths, reverse=True):
        for pack in bins:
            if pack[0] >= length and pack[1] < max_per_pack:
                pack[0] -= length
                pack[1] += 1
                break
        else:
            bins.append([max_length - length, 1])
    return len(bins)


def random_lengths(n, max_length, mean, seed):
    rng = random.Random(seed)
    return [min(max_length, max(1, int(rng.expovariate(1 / mean)))) for _ in range(n)]


@pytest.mark.parametrize("max_length,mean,max_per_pack", [(128, 45, 3), (128, 45, 8), (512, 180, 3), (512, 60, 1)])
def test_every_sequence_once_and_no_row_overflows(max_length, mean, max_per_pack):
    lengths = random_lengths(3000, max_length, mean, seed=max_length + max_per_pack)
    packing = pack_sequences(lengths, max_length, max_per_pack)
    assert sorted(i for pack in packing.packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= max_length for pack in packing.packs)
    assert all(1 <= len(pack) <= max_per_pack for pack in packing.packs)
    assert packing.efficiency == pytest.approx(sum(lengths) / (len(packing.packs) * max_length))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_per_pack", [2, 3, 8])
def test_at_least_as_few_rows_as_first_fit_decreasing(seed, max_per_pack):
    lengths = random_lengths(2000, 128, [20, 45, 70][seed % 3], seed)
    assert len(pack_sequences(lengths, 128, max_per_pack).packs) <= first_fit_decreasing(lengths, 128, max_per_pack)


def test_packing_beats_one_sequence_per_row():
    lengths = random_lengths(5000, 512, 150, seed=1)
    packing = pack_sequences(lengths, 512, 3)
    assert packing.efficiency > 2 * padded_efficiency(lengths, 512)  # 0.70 against 0.28


def test_complementary_lengths_fill_rows_exactly():
    lengths = [100, 60, 28, 60, 8]
    packing = pack_sequences(lengths, 128, 3)
    assert sorted(sorted(lengths[i] for i in pack) for pack in packing.packs) == [[8, 60, 60], [28, 100]]
    assert packing.efficiency == 1.0


def test_same_lengths_same_packs():
    lengths = random_lengths(1000, 128, 40, seed=3)
    assert pack_sequences(lengths, 128, 3).packs == pack_sequences(list(lengths), 128, 3).packs


def test_one_per_pack_is_padding():
    lengths = [5, 7, 128]
    packing = pack_sequences(lengths, 128, 1)
    assert sorted(packing.packs) == [[0], [1], [2]]
    assert packing.efficiency == pytest.approx(padded_efficiency(lengths, 128))


@pytest.mark.parametrize("lengths,max_per_pack,message", [
    ([10, 129], 3, "129 tokens cannot be packed into rows of 128"),
    ([10, 0], 3, "0 tokens"),
    ([10], 0, "--max_sequences_per_pack must be at least 1"),
])
def test_refusals(lengths, max_per_pack, message):
    with pytest.raises(UserError, match=message):
        pack_sequences(lengths, 128, max_per_pack)
