"""A rerun does exactly what changed: the real snakemake command on the tiny model, on the CPU.

One finished run is the template; each test copies it (results, Snakemake's metadata, inputs,
file times) and changes what a user would change.
"""

import json
import os
import random
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    assert_same_embeddings,
    completed_run,
    config_for,
    fair_esm_mean,
    random_sequences,
    read_embeddings,
    run_snakemake,
    small_filesystem,
    write_fasta,
)
from esmshard.model import load_model, write_random_checkpoint

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast


N = 500  # the template run's proteins


@pytest.fixture(scope="module")
def proteins():
    return random_sequences(N, seed=21, median=60, cap=400)


@pytest.fixture(scope="module")
def template(tmp_path_factory, proteins, tiny_checkpoint):
    """A finished two-rank run on input/a.fasta (the config names input/*.fasta), its own model file."""
    workdir = tmp_path_factory.mktemp("template")
    (workdir / "input").mkdir()
    write_fasta(workdir / "input/a.fasta", proteins)
    shutil.copy(tiny_checkpoint, workdir / "model.pt")
    return completed_run(workdir, config_for("input/*.fasta", "model.pt", world_size=2))


def copy_of(template: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The template run in a new directory, and its config pointing there."""
    workdir = tmp_path / "run"
    shutil.copytree(template, workdir, symlinks=True)
    return workdir, config_for("input/*.fasta", "model.pt", world_size=2)  # paths relative to the run


def manifest(workdir: Path) -> dict:
    return json.loads((workdir / "results/manifest.json").read_text())


def rank_logs(workdir: Path) -> str:
    return "".join(path.read_text() for path in sorted((workdir / "logs/embed").glob("rank_*.log")))


def computed_by_ranks(workdir: Path) -> int:
    """Sequences the ranks of the last run computed, from their logs."""
    return sum(int(n) for n in re.findall(r", (\d+) to compute", rank_logs(workdir)))


def rules_run(output: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", output, re.M))


ADDED = "MKKLLPTAAGLLLLAAQPAMAMDIGINSDPNSSSVDKLAAALEHHHHHH"


def test_one_protein_added_to_many_costs_one_protein(template, tmp_path, proteins):
    workdir, config = copy_of(template, tmp_path)
    with open(workdir / "input/a.fasta", "a") as fasta:
        fasta.write(f">added\n{ADDED}\n")
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["computed"] == 1 and manifest(workdir)["reused"] == N
    assert computed_by_ranks(workdir) == 1 and rank_logs(workdir).count("loaded in") == 1
    # what a fresh run gives: the first run's rows bit for bit, then fair-esm's for the new one
    ids, vectors, _ = read_embeddings(workdir / "results/embeddings.h5")
    first_ids, first_vectors, _ = read_embeddings(template / "results/embeddings.h5")
    assert ids == [*first_ids, "added"] and vectors[:N].tobytes() == first_vectors.tobytes()
    network, alphabet = load_model(str(workdir / "model.pt"))
    assert np.abs(vectors[N] - fair_esm_mean(network, alphabet, ADDED, 2)).max() <= 1e-5


def test_identical_sequences_under_other_ids_are_embedded_once(tmp_path, tiny_checkpoint):
    distinct = random_sequences(200, seed=5, median=80, cap=300)
    rng = np.random.default_rng(1)
    copies = {f"copy{i:03d}": distinct[name] for i, name in enumerate(rng.choice(list(distinct), 300))}
    records = {**distinct, **copies}
    write_fasta(tmp_path / "mutants.fasta", records)
    completed_run(tmp_path, config_for(tmp_path / "mutants.fasta", tiny_checkpoint, world_size=2))
    assert manifest(tmp_path)["distinct_sequences"] == 200 and manifest(tmp_path)["computed"] == 200
    ids, vectors, _ = read_embeddings(tmp_path / "results/embeddings.h5")
    assert ids == list(records)
    row = {seq_id: i for i, seq_id in enumerate(ids)}
    first_of = {}
    for seq_id, sequence in records.items():
        first_of.setdefault(sequence, seq_id)
        assert np.array_equal(vectors[row[seq_id]], vectors[row[first_of[sequence]]])
    network, alphabet = load_model(str(tiny_checkpoint))
    for seq_id in list(copies)[:20]:
        assert np.abs(vectors[row[seq_id]] - fair_esm_mean(network, alphabet, records[seq_id], 2)).max() <= 1e-5


def test_files_added_to_and_removed_from_the_glob_are_noticed(template, tmp_path, proteins):
    workdir, config = copy_of(template, tmp_path)
    added = random_sequences(5, seed=99, median=50)
    write_fasta(workdir / "input/b.fasta", {f"added{i}": sequence for i, sequence in enumerate(added.values())})
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["sequences"] == N + 5 and manifest(workdir)["computed"] == 5
    (workdir / "input/b.fasta").unlink()
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["sequences"] == N and manifest(workdir)["computed"] == 0
    assert "loaded in" not in rank_logs(workdir)
    assert_same_embeddings(workdir, template)  # bit for bit: the very vectors of the first run


def test_the_order_of_the_fasta_files_is_the_order_of_the_output(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    write_fasta(workdir / "input/b.fasta", random_sequences(5, seed=98, median=50))
    b_ids = [f"seq{i:05d}" for i in range(5)]
    (workdir / "input/b.fasta").write_text((workdir / "input/b.fasta").read_text().replace("seq", "b_seq"))
    for order in (["input/a.fasta", "input/b.fasta"], ["input/b.fasta", "input/a.fasta"]):
        result = run_snakemake(workdir, {**config, "fasta": order})
        assert result.returncode == 0, result.stderr
        ids, _, _ = read_embeddings(workdir / "results/embeddings.h5")
        b_first = order[0] == "input/b.fasta"
        assert (ids[:5] if b_first else ids[-5:]) == [f"b_{i}" for i in b_ids]
    assert "loaded in" not in rank_logs(workdir)  # the order changes no number


def test_another_input_is_noticed_without_snakemakes_metadata(template, tmp_path, proteins):
    """fasta pointed at an older file, with .snakemake deleted (its modification times alone say
    nothing is newer than the index): the index is built again."""
    workdir, config = copy_of(template, tmp_path)
    shutil.rmtree(workdir / ".snakemake")
    older = write_fasta(workdir / "input/older.fasta", dict(list(proteins.items())[:30]))
    os.utime(older, (1_600_000_000, 1_600_000_000))
    result = run_snakemake(workdir, {**config, "fasta": ["input/older.fasta"]}, targets=())  # rule all's inputs
    assert result.returncode == 0, result.stderr
    assert read_embeddings(workdir / "results/embeddings.h5")[0] == list(proteins)[:30]


def test_another_model_at_the_same_path_is_noticed(template, tmp_path, proteins):
    workdir, config = copy_of(template, tmp_path)
    write_random_checkpoint(workdir / "model.pt", 2, 32, 4, seed=9)
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["computed"] == N
    ids, vectors, _ = read_embeddings(workdir / "results/embeddings.h5")
    _, old, _ = read_embeddings(template / "results/embeddings.h5")
    network, alphabet = load_model(str(workdir / "model.pt"))
    for i in range(0, N, N // 8):
        assert np.abs(vectors[i] - fair_esm_mean(network, alphabet, proteins[ids[i]], 2)).max() <= 1e-5
    assert np.abs(vectors - old).max() > 0.1


def test_an_unchanged_input_rerun_loads_no_model_and_changes_no_number(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    (workdir / "input/a.fasta").touch()
    for extra in ((), ("--forcerun", "index")):  # a touch alone may be seen through by checksum
        result = run_snakemake(workdir, config, *extra)
        assert result.returncode == 0, result.stderr
        assert "loaded in" not in rank_logs(workdir) or "Nothing to be done" in result.stderr
        assert_same_embeddings(workdir, template)
    assert {"index", "plan", "embed", "aggregate"} <= rules_run(result.stderr)
    assert "loaded in" not in rank_logs(workdir)


# Options of how a rank works, not of what it computes.
NO_NUMBER_CHANGES = {
    "progress_seconds": 7,
    "segment_seconds": 11,
    "segment_sequences": 13,
    "tokens_per_batch": 999,
    "timeout": "11h30m",
    "threads_per_rank": 2,
    "gpu_lock_dir": "/tmp/esmshard-other-locks",
}


def test_settings_that_change_no_number_and_snakemakes_retries_rerun_nothing(template, tmp_path):
    """All at once: any one of them rerunning a job would show in this one run."""
    workdir, config = copy_of(template, tmp_path)
    result = run_snakemake(workdir, {**config, **NO_NUMBER_CHANGES}, "--retries", "3")
    assert result.returncode == 0 and "Nothing to be done" in result.stderr, result.stderr


def test_a_precision_that_auto_already_means_computes_nothing(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    result = run_snakemake(workdir, {**config, "precision": "float32"})  # auto is float32 on the CPU
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["computed"] == 0 and "loaded in" not in rank_logs(workdir)
    assert_same_embeddings(workdir, template)


def test_windowing_long_proteins_computes_only_the_long_ones(template, tmp_path):
    """long_sequences changes the outputs of proteins longer than 1,022 residues only: switching it
    computes those, and every other vector is reused as it is; switching back computes nothing."""
    workdir, config = copy_of(template, tmp_path)
    with open(workdir / "input/a.fasta", "a") as fasta:
        fasta.write(">long\n" + "".join(random.Random(5).choices("ACDEFGHIKLMNPQRSTVWY", k=1500)) + "\n")
    ids, before, _ = read_embeddings(template / "results/embeddings.h5")
    for long_sequences, computed in (("truncate", 1), ("window", 1), ("truncate", 0)):
        result = run_snakemake(workdir, {**config, "long_sequences": long_sequences})
        assert result.returncode == 0, result.stderr
        assert manifest(workdir)["computed"] == computed, long_sequences
        after_ids, after, attrs = read_embeddings(workdir / "results/embeddings.h5")
        assert after_ids == [*ids, "long"] and attrs["long_sequences"] == long_sequences
        assert after[:-1].tobytes() == before.tobytes()


def test_compression_rewrites_only_embeddings_h5_from_the_shards(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    for compression, filters in (("gzip", ("gzip", True)), ("none", (None, False))):
        result = run_snakemake(workdir, {**config, "compression": compression})
        assert result.returncode == 0, result.stderr
        assert rules_run(result.stderr) == {"aggregate"}  # no rank, no model loaded
        with h5py.File(workdir / "results/embeddings.h5") as h5:
            assert (h5["mean/layer_2"].compression, h5["mean/layer_2"].shuffle) == filters
        assert_same_embeddings(workdir, template)
    with h5py.File(workdir / "results/shards/shard_0.h5") as shard:
        assert shard["mean/layer_2"].compression is None


def test_a_new_world_size_replans_without_reading_fasta_or_loading_the_model(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    result = run_snakemake(workdir, {**config, "world_size": 3})
    assert result.returncode == 0, result.stderr
    assert "index" not in rules_run(result.stderr) and {"plan", "embed"} <= rules_run(result.stderr)
    assert "loaded in" not in rank_logs(workdir) and manifest(workdir)["world_size"] == 3
    assert_same_embeddings(workdir, template)


def test_changed_layers_recompute_and_changing_back_reuses_the_store(template, tmp_path):
    workdir, config = copy_of(template, tmp_path)
    result = run_snakemake(workdir, {**config, "layers": [-1, 1]})
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["computed"] == N
    with h5py.File(workdir / "results/embeddings.h5") as h5:
        assert sorted(h5["mean"]) == ["layer_1", "layer_2"]
    result = run_snakemake(workdir, config)  # the ranks rerun: snakemake deletes their shards first
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["computed"] == 0 and "loaded in" not in rank_logs(workdir)
    assert rank_logs(workdir).count("assembling") == 2  # each shard again from the store
    assert_same_embeddings(workdir, template)


def test_a_shard_of_another_model_is_never_data(template, tmp_path, proteins):
    """Copied in after its job: the next run sees the changed shard and redoes that rank before
    merging. Read by the aggregation itself: a failed rank, named, that the next run redoes."""
    workdir, config = copy_of(template, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(template, other, symlinks=True)
    write_random_checkpoint(other / "model.pt", 2, 32, 4, seed=9)
    completed_run(other, config_for("input/*.fasta", "model.pt", world_size=2))
    shutil.copy(other / "results/shards/shard_1.h5", workdir / "results/shards/shard_1.h5")
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
    assert manifest(workdir)["complete"] and "loaded in" not in (workdir / "logs/embed/rank_1.log").read_text()
    assert_same_embeddings(workdir, template)

    from esmshard.aggregate import aggregate
    from esmshard.work import RankSettings

    shutil.copy(other / "results/shards/shard_1.h5", workdir / "results/shards/shard_1.h5")
    results = workdir / "results"
    merged = aggregate(
        results / "index",
        results / "plan.h5",
        [results / f"shards/shard_{r}.h5" for r in (0, 1)],
        [results / f"status/rank_{r}.json" for r in (0, 1)],
        RankSettings.from_config(config),
        results / "embeddings.h5",
        results / "manifest.json",
        results / "missing_ids.txt",
    )
    (failed,) = merged["ranks_failed"]
    assert failed["rank"] == 1 and "other settings (settings_key" in failed["error"] and failed["rejected"]
    ids, _, _ = read_embeddings(workdir / "results/embeddings.h5")
    assert len(ids) == N - len(failed["missing_ids"]) and not set(ids) & set(failed["missing_ids"])
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
    assert_same_embeddings(workdir, template)


def test_more_ranks_than_proteins_leaves_empty_ranks_that_succeed(tmp_path, tiny_checkpoint):
    write_fasta(tmp_path / "few.fasta", random_sequences(2, seed=2))
    completed_run(tmp_path, config_for(tmp_path / "few.fasta", tiny_checkpoint, world_size=3))
    assert manifest(tmp_path)["complete"] and manifest(tmp_path)["ranks_succeeded"] == [0, 1, 2]
    assert len(read_embeddings(tmp_path / "results/embeddings.h5")[0]) == 2


def test_a_released_model_is_downloaded_once_for_all_ranks(tmp_path):
    from esmshard.architectures import ESM2_MODELS

    write_random_checkpoint(tmp_path / "mirror/esm2_t6_8M_UR50D.pt", *ESM2_MODELS["esm2_t6_8M_UR50D"])
    write_fasta(tmp_path / "p.fasta", random_sequences(12, seed=4, median=40))
    env = {"TORCH_HOME": str(tmp_path / "torch"), "ESMSHARD_MODEL_URL": f"file://{tmp_path}/mirror/{{name}}.pt"}
    config = config_for(tmp_path / "p.fasta", "esm2_t6_8M_UR50D", world_size=2)
    result = run_snakemake(tmp_path, config, env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^download_model\s+1$", result.stderr, re.M)
    assert (tmp_path / "torch/hub/checkpoints/esm2_t6_8M_UR50D.pt").is_file()
    assert manifest(tmp_path)["complete"] and manifest(tmp_path)["computed"] == 12
    assert "Nothing to be done" in run_snakemake(tmp_path, config, env=env).stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MiB file system where the store goes (root only: it mounts a tmpfs)."""
    with small_filesystem(tmp_path / "results/store", "9m") as store:
        yield store


@pytest.mark.parametrize(
    "pooling, layers, proteins, segment",
    [(["mean", "per_residue"], [-1], 400, 50), (["per_residue"], [0, 1, 2], 150, 30)],
)
def test_a_full_disk_is_a_failed_rank_that_names_it_and_the_others_go_on(
    tmp_path, small_disk, tiny_checkpoint, pooling, layers, proteins, segment
):
    """Each rank's share is more than half the disk: the first fits, the second fails cleanly (HDF5
    allocates whole chunks, which the space check counts: it once died inside HDF5 instead)."""
    write_fasta(tmp_path / "p.fasta", random_sequences(proteins, seed=8, median=120, cap=300))
    config = config_for(
        tmp_path / "p.fasta", tiny_checkpoint, world_size=2, pooling=pooling, layers=layers, segment_sequences=segment
    )
    result = run_snakemake(tmp_path, config, cores=1)  # one rank after the other: the first fits
    assert result.returncode == 0, result.stderr
    (failed,) = manifest(tmp_path)["ranks_failed"]
    assert re.search(
        r"no space left on results/store/\w+: a store segment needs [\d.]+ MiB, [\d.]+ MiB are free", failed["error"]
    )
    assert "no space left on results/store/" in (tmp_path / f"logs/embed/rank_{failed['rank']}.log").read_text()
    ids, _, _ = read_embeddings(tmp_path / "results/embeddings.h5", f"{pooling[0]}/layer_2")
    assert len(ids) == proteins - len(failed["missing_ids"]) > 0


def test_a_failed_rank_then_a_replaced_model_never_mixes_the_two_models(template, tmp_path, proteins):
    workdir, config = copy_of(template, tmp_path)
    result = run_snakemake(workdir, config, "--forcerun", "plan", env={"ESMSHARD_FAIL_RANKS": "1"})
    assert result.returncode == 0 and not manifest(workdir)["complete"], result.stderr
    dry = run_snakemake(workdir, config, "--dry-run", "--rerun-triggers", "mtime")
    assert (
        "esmshard: rank 1 must be redone (it failed, or its shard or store rows changed), and --rerun-triggers"
        in dry.stdout + dry.stderr
    )
    write_random_checkpoint(workdir / "model.pt", 2, 32, 4, seed=9)
    result = run_snakemake(workdir, config)
    assert result.returncode == 0, result.stderr
    assert manifest(workdir)["complete"] and manifest(workdir)["computed"] == N
    ids, vectors, _ = read_embeddings(workdir / "results/embeddings.h5")
    network, alphabet = load_model(str(workdir / "model.pt"))
    for i in range(0, N, N // 20):  # both ranks' sequences: all of the new model
        assert np.abs(vectors[i] - fair_esm_mean(network, alphabet, proteins[ids[i]], 2)).max() <= 1e-5
