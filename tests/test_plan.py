import itertools
import re

import numpy as np
import pytest

from conftest import config_for, random_sequences, run_snakemake, small_filesystem, write_fasta
from esmshard.index import DIGEST
from esmshard.outputs import OutputSpec
from esmshard.plan import balance, distinct, imbalance, sequence_costs, space_warning

TRUNCATE = OutputSpec.resolve([-1], ["mean"], 2, "truncate", max_residues=1022)  # ESM-2's limit


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1000, 20000])
def test_balanced_within_two_percent_on_realistic_lengths(n, world_size):
    rng = np.random.default_rng(n + world_size)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, n).astype(int), 1, 5000)
    costs = sequence_costs(TRUNCATE, lengths, embed_dim=1280)
    ranks, rank_costs = balance(costs, world_size)
    assert imbalance(rank_costs) <= 1.02
    assert sorted(set(ranks.tolist())) == list(range(world_size))
    assert np.isclose(rank_costs.sum(), costs.sum())  # every sequence counted exactly once
    assert np.allclose(rank_costs, [costs[ranks == r].sum() for r in range(world_size)])


def best_contiguous_split(costs: np.ndarray, world_size: int) -> float:
    """The least most-loaded rank's cost over every way to cut ``costs`` into ``world_size`` runs."""
    prefix = np.concatenate([[0], np.cumsum(costs)])
    return min(
        max(np.diff(prefix[[0, *cuts, len(costs)]]))
        for cuts in itertools.combinations_with_replacement(range(len(costs) + 1), world_size - 1)
    )


def assert_contiguous_in_rank_order(ranks: np.ndarray) -> None:
    assert (np.diff(ranks) >= 0).all()  # rank r's sequences all precede rank r + 1's


@pytest.mark.parametrize("seed", range(40))
def test_shares_are_contiguous_and_the_best_contiguous_split(seed):
    rng = np.random.default_rng(seed)
    world_size = int(rng.integers(1, 5))
    costs = rng.choice([rng.integers(1, 10, 8), rng.lognormal(3, 1.5, 8)])[: rng.integers(1, 9)].astype(float)
    ranks, rank_costs = balance(costs, world_size)
    assert_contiguous_in_rank_order(ranks)
    assert np.isclose(rank_costs.max(), best_contiguous_split(costs, world_size), rtol=1e-12, atol=0)
    assert np.allclose(rank_costs, [costs[ranks == r].sum() for r in range(world_size)])


def test_realistic_shares_are_contiguous_and_even_below_the_most_loaded_rank():
    lengths = np.clip(np.random.default_rng(7).lognormal(np.log(300), 0.8, 20000).astype(int), 1, 5000)
    ranks, rank_costs = balance(sequence_costs(TRUNCATE, lengths, embed_dim=1280), 8)
    assert_contiguous_in_rank_order(ranks)
    assert rank_costs.min() / rank_costs.mean() >= 0.999  # the last rank does not take what is left over


def test_more_ranks_than_sequences_leaves_some_ranks_without_a_share():
    costs = sequence_costs(TRUNCATE, np.array([5, 50, 500]), 320)
    ranks, rank_costs = balance(costs, 5)
    assert_contiguous_in_rank_order(ranks)
    assert rank_costs.max() == costs.max() and (rank_costs == 0).sum() >= 2
    assert np.isclose(rank_costs.sum(), costs.sum())
    assert balance(np.zeros(0), 3)[0].tolist() == [] and balance(np.zeros(0), 3)[1].tolist() == [0, 0, 0]


def test_one_huge_sequence_has_a_rank_of_its_own():
    costs = np.array([1.0] * 6 + [1000.0] + [1.0] * 30)
    ranks, rank_costs = balance(costs, 4)
    assert_contiguous_in_rank_order(ranks)
    assert rank_costs.max() == 1000 and (ranks == ranks[6]).sum() == 1  # anything with it would be more


def test_cost_grows_faster_than_length_and_caps_at_1022():
    costs = sequence_costs(TRUNCATE, np.array([100, 1000, 1022, 5000]), embed_dim=320)
    assert costs[1] / costs[0] > 10
    assert costs[2] == costs[3]


def test_a_windowed_protein_costs_all_its_windows():
    lengths = np.array([300, 2500])
    windowed = OutputSpec.resolve([-1], ["mean"], 2, "window", 512, max_residues=1022)
    assert windowed.window_counts(lengths).tolist() == [1, 4]
    costs = sequence_costs(windowed, lengths, 1280)
    assert costs[1] == 4 * sequence_costs(TRUNCATE, np.array([1022]), 1280)[0]
    assert costs[0] == sequence_costs(TRUNCATE, lengths, 1280)[0]


def test_single_rank_takes_everything():
    ranks, rank_costs = balance(sequence_costs(TRUNCATE, np.array([5, 50, 500]), 320), 1)
    assert ranks.tolist() == [0, 0, 0] and imbalance(rank_costs) == 1.0


def test_identical_sequences_are_planned_once_at_their_first_occurrence():
    digests = np.frombuffer(b"".join(bytes([k]) * 16 for k in [3, 1, 3, 2, 1, 3]), dtype=DIGEST)
    first, source = distinct(digests)
    assert first.tolist() == [0, 1, 3]  # input order of first occurrences
    assert source.tolist() == [0, 1, 0, 2, 1, 0]  # every position knows its distinct sequence


def test_the_space_warning_counts_the_store_the_shards_and_the_merged_file(tmp_path):
    spec = OutputSpec.resolve([-1], ["mean", "per_residue"], 2, "window", max_residues=1022)
    lengths, position = np.array([100, 100, 50]), np.array([0, 2])  # the second is a copy of the first
    assert space_warning(tmp_path, spec, lengths, position, 32, "float32") is None
    huge = np.array([10**12, 10**12])  # 250 TiB of per-residue vectors each
    store = (10**12 + 1) * 64  # the one distinct sequence's rows, float16 at width 32: per residue and mean
    copied = (2 * 10**12 + 2) * 64  # both IDs' rows
    warning = space_warning(tmp_path, spec, huge, np.array([0]), 32, "float16")
    # the shards hold the mean alone (64 bytes): their per-residue rows are the store's
    assert warning.startswith(
        f"the embeddings of this run need up to {(store + 64 + copied) / 2**40:,.1f} TiB "
        f"in {tmp_path} (the store {store / 2**40:,.1f} TiB, the shards 0.1 KiB, "
        f"embeddings.h5 {copied / 2**40:,.1f} TiB; "
    )
    assert re.search(r"but only [\d,.]+ [KMGT]iB are free there: ranks will fail when the disk fills", warning)


@pytest.mark.workflow
def test_the_plan_rule_warns_before_any_rank_when_the_results_may_not_fit(tmp_path, tiny_checkpoint):
    write_fasta(tmp_path / "p.fasta", random_sequences(200, seed=3, median=300, cap=600))
    config = config_for(tmp_path / "p.fasta", tiny_checkpoint, pooling=["per_residue"])
    with small_filesystem(tmp_path / "results", "4m"):  # the index fits, 2 x ~8 MiB of vectors (store, copy) do not
        result = run_snakemake(tmp_path, config, targets=("plan",))
        assert result.returncode == 0, result.stderr
    warning = re.search(
        r"^esmshard: WARNING: the embeddings of this run need up to ([\d.]+) MiB in results", result.stderr, re.M
    )
    assert warning and float(warning[1]) > 14, result.stderr
    assert "only" in (tmp_path / "logs/plan.log").read_text() and not (tmp_path / "logs/embed").exists()
    assert (
        "need up to" not in run_snakemake(tmp_path, config, "--forcerun", "plan", targets=("plan",)).stderr
    )  # the real disk
