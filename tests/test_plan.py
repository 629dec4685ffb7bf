import numpy as np
import pytest

from esmshard.outputs import window_counts
from esmshard.index import DIGEST
from esmshard.plan import balance, distinct, imbalance, sequence_costs


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1000, 20000])
def test_balanced_within_two_percent_on_realistic_lengths(n, world_size):
    rng = np.random.default_rng(n + world_size)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, n).astype(int), 1, 5000)
    costs = sequence_costs(lengths, embed_dim=1280)
    ranks, rank_costs = balance(costs, world_size)
    assert imbalance(rank_costs) <= 1.02
    assert sorted(set(ranks.tolist())) == list(range(world_size))
    assert np.isclose(rank_costs.sum(), costs.sum())  # every sequence counted exactly once
    assert np.allclose(rank_costs, [costs[ranks == r].sum() for r in range(world_size)])


def test_cost_grows_faster_than_length_and_caps_at_1022():
    costs = sequence_costs(np.array([100, 1000, 1022, 5000]), embed_dim=320)
    assert costs[1] / costs[0] > 10
    assert costs[2] == costs[3]


def test_a_windowed_protein_costs_all_its_windows():
    lengths = np.array([300, 2500])
    windows = window_counts(lengths, "window", 512)
    assert windows.tolist() == [1, 4]
    costs = sequence_costs(lengths, 1280, windows)
    assert costs[1] == 4 * sequence_costs(np.array([1022]), 1280)[0]
    assert costs[0] == sequence_costs(lengths, 1280)[0]


def test_single_rank_takes_everything():
    ranks, rank_costs = balance(sequence_costs(np.array([5, 50, 500]), 320), 1)
    assert ranks.tolist() == [0, 0, 0] and imbalance(rank_costs) == 1.0


def test_identical_sequences_are_planned_once_at_their_first_occurrence():
    digests = np.frombuffer(b"".join(bytes([k]) * 16 for k in [3, 1, 3, 2, 1, 3]), dtype=DIGEST)
    first, source = distinct(digests)
    assert first.tolist() == [0, 1, 3]  # input order of first occurrences
    assert source.tolist() == [0, 1, 0, 2, 1, 0]  # every position knows its distinct sequence

