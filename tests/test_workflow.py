"""The real snakemake command on the tiny model, as a user runs it."""

import json
import re

import h5py
import numpy as np
import pytest

import esmshard
from conftest import (
    assert_same_embeddings,
    completed_run,
    config_for,
    fair_esm_mean,
    fair_esm_outputs,
    job_counts,
    planned_ids,
    random_sequences,
    read_embeddings,
    run_snakemake,
    write_fasta,
)
from esmshard.engine import PackedEngine
from esmshard.model import load_model
from esmshard.outputs import OutputSpec
from esmshard.reader import load_embeddings

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast


@pytest.fixture(scope="module")
def records():
    records = random_sequences(60, seed=11, median=150)
    records["len1"] = "M"
    records["len2"] = "MK"
    records["long3000"] = random_sequences(1, seed=12, median=3000, cap=3000)["seq00000"]
    return records


@pytest.fixture(scope="module")
def fasta(tmp_path_factory, records):
    return write_fasta(tmp_path_factory.mktemp("input") / "proteins.fasta", records)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, fasta, tiny_checkpoint):
    """Three ranks, nothing failing; what snakemake printed is in snakemake.txt."""
    workdir = tmp_path_factory.mktemp("clean3")
    result = run_snakemake(workdir, config_for(fasta, tiny_checkpoint, world_size=3), targets=())
    assert result.returncode == 0, result.stderr
    (workdir / "snakemake.txt").write_text(result.stderr)
    return workdir


def test_three_ranks_give_fair_esm_embeddings_in_input_order(clean_run, records, tiny_checkpoint):
    ids, embeddings, attrs = read_embeddings(clean_run / "results/embeddings.h5")
    assert ids == list(records)
    network, alphabet = load_model(str(tiny_checkpoint))
    for seq_id, vector in zip(ids, embeddings):
        assert np.abs(vector - fair_esm_mean(network, alphabet, records[seq_id], 2)).max() <= 1e-5
    with h5py.File(clean_run / "results/embeddings.h5") as h5:
        assert h5["truncated"][:].tolist() == [len(s) > 1022 for s in records.values()]
        assert h5["lengths"][:].tolist() == [len(s) for s in records.values()]
    assert (
        attrs["model"] == str(tiny_checkpoint) and list(attrs["layers"]) == [2] and list(attrs["pooling"]) == ["mean"]
    )
    versions = json.loads(attrs["versions"])
    assert attrs["dtype"] == "float32" and attrs["world_size"] == 3 and "fair-esm" in versions
    assert versions["esmshard"] == esmshard.__version__  # the running checkout's, installed or not
    manifest = json.loads((clean_run / "results/manifest.json").read_text())
    assert manifest["complete"] and manifest["ranks_succeeded"] == [0, 1, 2] and manifest["missing"] == 0
    # the tests' model was written by write_random_checkpoint: every run says so
    assert manifest["model"] == str(tiny_checkpoint) and manifest["random_weights"] is True
    warning = f"esmshard: WARNING: model {tiny_checkpoint} has RANDOM weights"
    assert warning in (clean_run / "snakemake.txt").read_text()
    assert (clean_run / "results/missing_ids.txt").read_text() == ""


def test_each_rank_writes_its_planned_share_with_progress(clean_run):
    for rank in range(3):
        with h5py.File(clean_run / f"results/shards/shard_{rank}.h5") as shard:
            assert list(shard["ids"].asstr()[:]) == planned_ids(clean_run, rank)
            assert shard.attrs["rank"] == rank and shard.attrs["world_size"] == 3
        log = (clean_run / f"logs/embed/rank_{rank}.log").read_text()
        assert re.search(r"sequences \(100.0%\), .* residues/s, elapsed .*, ETA 0:00:00", log)
    assert "rank cost max/mean" in (clean_run / "logs/plan.log").read_text()


def test_the_terminal_shows_all_ranks_progress_until_the_last_is_done(clean_run, records):
    lines = re.findall(r"^esmshard: progress: (.*)$", (clean_run / "snakemake.txt").read_text(), re.M)
    assert lines, "no progress line"
    residues = sum(min(len(sequence), 1022) for sequence in records.values())
    assert re.fullmatch(
        rf"{len(records)}/{len(records)} sequences \(100.0%\), {residues:,}/{residues:,} residues, "
        r"[1-9][\d,]* residues/s, ETA 0:00:00 \(ranks: 0 running, 3 done\)",
        lines[-1],
    ), lines[-1]


def test_every_job_log_says_when_its_process_started(clean_run):
    """Seconds from the process's start to the log's first line (interpreter, Snakemake's script
    preamble, imports): what bench/cpu_stages.py and bench/whole_run.py split a job's time by."""
    jobs = ["index", "plan", "embed/rank_0", "embed/rank_1", "embed/rank_2", "aggregate", "report_plots"]
    for job in jobs:
        log = (clean_run / f"logs/{job}.log").read_text()
        age = re.search(r"^\S+ \S+ INFO job process started ([\d.]+) s ago$", log, re.M)
        assert age and 0 < float(age.group(1)) < 60, (job, log[:300])


def test_shards_are_outputs_snakemake_knows(clean_run, fasta, tiny_checkpoint):
    """--summary and --delete-all-output (storage plugins too) see every shard next to its status."""
    config = config_for(fasta, tiny_checkpoint, world_size=3)
    summary = run_snakemake(clean_run, config, "--summary")
    delete = run_snakemake(clean_run, config, "--delete-all-output", "--dry-run")
    for rank in range(3):
        assert re.search(rf"^results/shards/shard_{rank}.h5\t.*\tembed\t", summary.stdout, re.M), summary.stdout
        assert f"results/shards/shard_{rank}.h5" in delete.stdout + delete.stderr
    assert (clean_run / "results/shards/shard_0.h5").exists()  # a dry run deletes nothing


def test_one_rank_equals_three_ranks(tmp_path, clean_run, fasta, tiny_checkpoint):
    completed_run(tmp_path, config_for(fasta, tiny_checkpoint, world_size=1))
    assert_same_embeddings(tmp_path, clean_run, atol=1e-5)


def test_failed_rank_gives_partial_result_then_a_rerun_retries_only_it(tmp_path, clean_run, fasta, tiny_checkpoint):
    config = config_for(fasta, tiny_checkpoint, world_size=3)
    first = run_snakemake(tmp_path, config, "--retries", "1", env={"ESMSHARD_FAIL_RANKS": "1"})
    assert first.returncode == 0, first.stderr
    assert re.search(r"WARNING: rank\(s\) 1 failed: \d+ of 63 sequences are missing", first.stderr)
    log = (tmp_path / "logs/embed/rank_1.log").read_text()
    assert "attempt 2 of 2" in log and "failed on its last attempt (2)" in log  # retried once, as --retries says

    missing = planned_ids(tmp_path, 1)
    manifest = json.loads((tmp_path / "results/manifest.json").read_text())
    assert not manifest["complete"] and manifest["ranks_succeeded"] == [0, 2]
    assert [f["rank"] for f in manifest["ranks_failed"]] == [1]
    assert "fault injected" in manifest["ranks_failed"][0]["error"]
    assert manifest["ranks_failed"][0]["missing_ids"] == missing and manifest["missing"] == len(missing)
    assert (tmp_path / "results/missing_ids.txt").read_text().split() == missing
    ids, _, attrs = read_embeddings(tmp_path / "results/embeddings.h5")
    all_ids, _, _ = read_embeddings(clean_run / "results/embeddings.h5")
    assert ids == [i for i in all_ids if i not in set(missing)]
    assert list(attrs["ranks_failed"]) == [1]
    with h5py.File(tmp_path / "results/shards/shard_1.h5") as shard:  # a failure shard: the error, no data
        assert shard.attrs["failed"] and "fault injected" in shard.attrs["error"] and not list(shard)

    kept = {r: (tmp_path / f"results/shards/shard_{r}.h5").stat() for r in (0, 2)}
    second = run_snakemake(tmp_path, config)
    assert second.returncode == 0, second.stderr
    assert job_counts(second.stderr) == {"retry_rank": 1, "embed": 1, "aggregate": 1}
    assert "wildcards: rank=1" in second.stderr
    for rank, before in kept.items():
        after = (tmp_path / f"results/shards/shard_{rank}.h5").stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_same_embeddings(tmp_path, clean_run)
    assert json.loads((tmp_path / "results/manifest.json").read_text())["complete"]

    third = run_snakemake(tmp_path, config)
    assert third.returncode == 0 and "Nothing to be done" in third.stderr


def test_all_ranks_failing_fails_the_run(tmp_path, fasta, tiny_checkpoint):
    config = config_for(fasta, tiny_checkpoint, world_size=2)
    result = run_snakemake(tmp_path, config, env={"ESMSHARD_FAIL_RANKS": "0,1"})
    assert result.returncode != 0
    assert "no rank succeeded, so there are no embeddings (rank 0: RuntimeError: fault injected" in result.stderr
    assert not (tmp_path / "results/embeddings.h5").exists()


def test_require_complete_turns_a_failed_rank_into_a_failure(tmp_path, fasta, tiny_checkpoint):
    config = config_for(fasta, tiny_checkpoint, world_size=2, require_complete=True)
    result = run_snakemake(tmp_path, config, env={"ESMSHARD_FAIL_RANKS": "1"})
    assert result.returncode != 0
    assert re.search(r"require_complete is set and rank\(s\) 1 failed \(\d+ sequences missing\)", result.stderr)
    assert not (tmp_path / "results/embeddings.h5").exists()


# One bad input per place that finds them, the FASTA reader and the index across files (every
# message of each: tests/test_fasta.py, tests/test_index.py).
BAD_INPUTS = {
    "duplicate across files": (
        {"a.fasta": ">x\nMKV\n", "b.fasta": ">x\nMKV\n"},
        r"duplicate sequence ID 'x': .*a.fasta record 1 .*b.fasta record 1",
    ),
    "character outside the alphabet": (
        {"a.fasta": ">x\nMKV\n>y\nMK#V\n"},
        r"a.fasta: record 2 \('y', line 3\): residue 3 is '#'",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_before_any_model_work(tmp_path, tiny_checkpoint, case):
    files, message = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    config = config_for(tmp_path / "missing", tiny_checkpoint, world_size=2)
    config["fasta"] = [str(tmp_path / name) for name in files]
    result = run_snakemake(tmp_path, config)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-3000:]
    assert not (tmp_path / "results/shards").exists() and not list(tmp_path.glob("results/status/*.json"))
    assert not (tmp_path / "results/embeddings.h5").exists() and not (tmp_path / "results/plan.h5").exists()
    # the index's own files (the list of the FASTA files it read is no index)
    assert not [path for path in (tmp_path / "results").glob("index/*") if not path.name.startswith("fasta_list_")]


def test_replace_policy_maps_unknown_letters_to_x(tmp_path, tiny_checkpoint):
    (tmp_path / "a.fasta").write_text(">x\nMKJV*\n>y\nmk-v\n")
    result = run_snakemake(
        tmp_path, config_for(tmp_path / "a.fasta", tiny_checkpoint, world_size=1, invalid_residues="replace")
    )
    assert result.returncode == 0, result.stderr
    assert "replaced 2 residues outside the 25 residue letters with X" in (tmp_path / "logs/index.log").read_text()
    ids, embeddings, _ = read_embeddings(tmp_path / "results/embeddings.h5")
    network, alphabet = load_model(str(tiny_checkpoint))
    assert ids == ["x", "y"]
    assert np.abs(embeddings[1] - fair_esm_mean(network, alphabet, "MKXV", 2)).max() <= 1e-5


@pytest.mark.parametrize(
    "change, messages",
    [
        (  # the schema's errors, every one in the line
            {"dtype": "float64", "modle": "x"},
            [r"dtype: 'float64' is not one of \['float32', 'float16'\]", r"\('modle' was unexpected\)"],
        ),
        (
            {"compile": "auto", "chunk_sequences": 5},
            ["compile is no longer an option: delete it", "chunk_sequences is no longer an option: it is now segment_"],
        ),
        # what the rule files check (the model, the FASTA patterns, durations: each message is
        # tested where it is made)
        ({"timeout": "banana"}, ["timeout: 'banana' is not a duration; give seconds"]),
    ],
)
def test_bad_config_values_are_named(tmp_path, fasta, tiny_checkpoint, change, messages):
    """One line naming each bad option, its value and what is allowed; no schema dump, no traceback."""
    result = run_snakemake(tmp_path, {**config_for(fasta, tiny_checkpoint), **change}, "-n")
    assert result.returncode != 0
    lines = [line for line in (result.stderr + result.stdout).splitlines() if not line.startswith("Using workflow")]
    assert len(lines) == 1 and lines[0].startswith("esmshard: ERROR: "), result.stderr[-3000:]
    assert all(re.search(message, lines[0]) for message in messages), lines[0]


def test_jobs_without_a_shared_filesystem_stop_before_any_job(tmp_path, fasta, tiny_checkpoint):
    result = run_snakemake(tmp_path, config_for(fasta, tiny_checkpoint), "-n", "--shared-fs-usage", "none")
    assert result.returncode != 0
    lines = [line for line in (result.stderr + result.stdout).splitlines() if not line.startswith("Using workflow")]
    assert lines == [
        "esmshard: ERROR: esmshard needs a filesystem shared by its jobs (for its store of finished work, the "
        "ranks' shards and status files): keep input-output in --shared-fs-usage (the default) and set no default "
        "storage provider"
    ], result.stderr[-3000:]


def test_world_size_defaults_to_visible_gpus(tmp_path, fasta, tiny_checkpoint):
    """(which GPUs are visible: tests/test_gpu.py)"""
    result = run_snakemake(tmp_path, config_for(fasta, tiny_checkpoint), "-n", env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout + result.stderr)["embed"] == 2


def test_reference_engine_through_the_workflow(tmp_path, clean_run, fasta, records, tiny_checkpoint):
    result = run_snakemake(tmp_path, config_for(fasta, tiny_checkpoint, world_size=1, engine="reference"))
    assert result.returncode == 0, result.stderr
    ids, embeddings, attrs = read_embeddings(tmp_path / "results/embeddings.h5")
    packed_ids, packed, packed_attrs = read_embeddings(clean_run / "results/embeddings.h5")
    assert attrs["engine"] == "reference" and packed_attrs["engine"] == "packed"
    assert ids == packed_ids == list(records)
    network, alphabet = load_model(str(tiny_checkpoint))
    for seq_id, vector in zip(ids[:20], embeddings[:20]):
        assert np.abs(vector - fair_esm_mean(network, alphabet, records[seq_id], 2)).max() <= 1e-5
    assert np.abs(embeddings - packed).max() <= 1e-4


def test_every_output_at_once_lands_in_input_order(tmp_path, fasta, records, tiny_checkpoint):
    """Three layers, mean + BOS + per-residue, float16 on disk, windows for the 3,000-residue
    protein, two ranks: the merged file holds each output in input order, equal to fair-esm
    for every protein the model takes whole, and to the engine's own windows for the long one."""
    config = config_for(
        fasta,
        tiny_checkpoint,
        world_size=2,
        layers=[-1, 0, 1],
        dtype="float16",
        pooling=["per_residue", "mean", "bos"],
        long_sequences="window",
        segment_sequences=7,
    )
    completed_run(tmp_path, config)
    merged = tmp_path / "results/embeddings.h5"
    with h5py.File(merged) as h5:
        assert sorted(name for name in h5 if isinstance(h5[name], h5py.Group)) == ["bos", "mean", "per_residue"]
        assert sorted(h5["per_residue"]) == ["layer_0", "layer_1", "layer_2"]
        assert h5["per_residue/layer_2"].dtype == np.float16 and h5["mean/layer_0"].shape == (len(records), 32)
        assert h5["residue_offsets"][-1] == sum(len(s) for s in records.values())  # windows: nothing truncated
        assert not h5["truncated"][:].any() and h5.attrs["long_sequences"] == "window"
    network, alphabet = load_model(str(tiny_checkpoint))
    for layer in (0, 1, 2):
        ids, means = load_embeddings(merged, layer=layer)
        _, bos = load_embeddings(merged, pooling="bos", layer=layer)
        _, per_residue = load_embeddings(merged, pooling="per_residue", layer=layer)
        assert ids == list(records)
        for i, seq_id in enumerate(ids[:-1]):  # every protein but the 3,000-residue one
            expected = fair_esm_outputs(network, alphabet, records[seq_id], layer)
            for got, want in (
                (means[i], expected["mean"]),
                (bos[i], expected["bos"]),
                (per_residue[i], expected["per_residue"]),
            ):
                assert np.allclose(got, want, rtol=2e-3, atol=2e-3), (seq_id, layer)
    spec = OutputSpec.resolve([-1, 0, 1], ["per_residue"], 2, "window", max_residues=1022)
    long = PackedEngine(network, alphabet, "cpu", "float32", spec).embed(
        [np.frombuffer(records["long3000"].encode(), np.uint8)]
    )
    assert per_residue[-1].shape == (len(records["long3000"]), 32)
    assert np.allclose(per_residue[-1], long["per_residue/layer_2"], rtol=2e-3, atol=2e-3)
    # The shards refer to their per-residue rows in the store (written once); embeddings.h5 holds
    # its own copy, so it can be moved alone.
    with h5py.File(tmp_path / "results/shards/shard_1.h5") as shard:
        sources = {source.file_name for source in shard["per_residue/layer_2"].virtual_sources()}
        assert sources and all(name.startswith("../store/") for name in sources)
    alone = tmp_path / "elsewhere" / "embeddings.h5"
    alone.parent.mkdir()
    alone.write_bytes(merged.read_bytes())
    with h5py.File(alone) as h5:
        assert not any(h5[f"per_residue/layer_{layer}"].is_virtual for layer in (0, 1, 2))
    _, moved = load_embeddings(alone, pooling="per_residue", layer=2)
    assert all(np.array_equal(a, b) for a, b in zip(moved, per_residue))


def test_a_precision_the_cpu_cannot_run_fails_the_rank_before_its_model_loads(tmp_path, fasta, tiny_checkpoint):
    config = config_for(fasta, tiny_checkpoint, world_size=1, engine="reference", precision="float16")
    result = run_snakemake(tmp_path, config)
    assert result.returncode != 0
    assert "precision: the reference engine computes in float32 only on the CPU, not float16" in result.stderr
    assert "loaded in" not in (tmp_path / "logs/embed/rank_0.log").read_text()
