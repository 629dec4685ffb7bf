"""Crash safety inside a rank: stop signals, time limits, damaged files, changed settings (random
SIGKILLs: test_sigkill.py).

Everything runs the real snakemake command on the tiny model, on the CPU, where results are
deterministic: a resumed run must give bit-identical embeddings to an uninterrupted one.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    assert_same_embeddings,
    completed_run,
    planned_ids,
    random_sequences,
    read_embeddings,
    run_snakemake,
    write_fasta,
)
from crashes import (  # noqa: F401 (fixtures)
    CRASH_PROTEINS,
    SEGMENT,
    clean2,
    config_for,
    embed_processes,
    fasta,
    half_written,
    segment_files,
    start_snakemake,
    wait_for,
)
from esmshard import aggregate as aggregate_module
from esmshard.work import RankSettings

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast


@pytest.fixture(scope="module")
def clean1(tmp_path_factory, fasta, tiny_checkpoint):
    return completed_run(tmp_path_factory.mktemp("clean1"), config_for(fasta, tiny_checkpoint, world_size=1))


def stop_after_first_segment(workdir: Path, config: dict, signum=signal.SIGTERM):
    """Run until the rank's first store segment is on disk, then send ``signum`` to the rank;
    returns seconds to exit."""
    before = set(segment_files(workdir))
    process = start_snakemake(workdir, config)
    assert wait_for(lambda: set(segment_files(workdir)) - before, timeout=120), "no segment was written"
    (pid,) = embed_processes(workdir)
    sent = time.monotonic()
    os.kill(pid, signum)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=30)
    seconds = time.monotonic() - sent
    assert process.wait(timeout=120) != 0
    return seconds


def rank_status(workdir: Path, rank: int = 0) -> dict:
    return json.loads((workdir / f"results/status/rank_{rank}.json").read_text())


def rank_log(workdir: Path, rank: int) -> str:
    return (workdir / f"logs/embed/rank_{rank}.log").read_text()


def test_sigterm_keeps_finished_work_and_the_rerun_computes_only_the_rest(tmp_path, fasta, tiny_checkpoint, clean1):
    config = config_for(fasta, tiny_checkpoint, world_size=1)
    seconds = stop_after_first_segment(tmp_path, config)
    assert seconds < 5
    log = (tmp_path / "logs/embed/rank_0.log").read_text()
    assert "stopped by SIGTERM" in log
    kept = int(re.search(rf"stopped with (\d+) of {CRASH_PROTEINS} sequences in the store", log)[1])
    assert kept >= SEGMENT
    assert rank_status(tmp_path)["ok"] is False and "Stopped" in rank_status(tmp_path)["error"]  # recorded
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "logs/embed/rank_0.log").read_text()
    assert f"; {kept} already in the store" in log
    status = rank_status(tmp_path)
    assert status["residues_computed"] < status["residues"]
    assert_same_embeddings(tmp_path, clean1)


def test_ctrl_c_then_the_same_command_again_resumes(tmp_path, fasta, tiny_checkpoint, clean1):
    """Ctrl-C reaches snakemake and its jobs at once (SIGINT to the process group); the same
    command again, with no extra flag, resumes from the store and equals an uninterrupted run."""
    config = config_for(fasta, tiny_checkpoint, world_size=1)
    process = start_snakemake(tmp_path, config, start_new_session=True)
    assert wait_for(lambda: segment_files(tmp_path), timeout=120), "no segment was written"
    with open(tmp_path / "results/.lock") as lock, pytest.raises(BlockingIOError):  # held by the run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=120) != 0
    assert "stopped by SIGINT" in rank_log(tmp_path, 0)
    kept = len(segment_files(tmp_path))
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert re.search(r"; [1-9]\d* already in the store", rank_log(tmp_path, 0)) and kept
    assert_same_embeddings(tmp_path, clean1)


def test_a_second_run_on_results_in_use_stops_before_any_job(tmp_path, tiny_checkpoint):
    """Two workflows reaching one results folder (here through a symbolic link): the second stops
    with one line naming the first, which holds the folder's lock (as a running snakemake does:
    test_ctrl_c_then_the_same_command_again_resumes)."""
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "results").mkdir(parents=True), second.mkdir()
    (second / "results").symlink_to(first / "results")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_RESULTS, str(first / "results")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"holding\n"
        other = write_fasta(tmp_path / "other.fasta", random_sequences(20, seed=77))
        result = run_snakemake(second, config_for(other, tiny_checkpoint, world_size=1))
    finally:
        holder.kill(), holder.wait()
    assert result.returncode != 0
    in_use = f"esmshard: {first / 'results'} is in use by another esmshard run (pid {holder.pid} on "
    assert in_use in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (first / "results/index").exists() and not list(second.glob("logs/*.log"))  # no job ran


HOLD_RESULTS = """
import sys
from esmshard.mainprocess import hold_results
hold_results(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
"""


def test_corrupt_and_torn_segments_are_recomputed(tmp_path, fasta, tiny_checkpoint, clean1):
    config = config_for(fasta, tiny_checkpoint, world_size=1, segment_sequences=100)
    stop_after_first_segment(tmp_path, config)
    while len(segment_files(tmp_path)) < 2:
        stop_after_first_segment(tmp_path, config)
    damaged, torn = segment_files(tmp_path)[:2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4096] = os.urandom(4096)  # values: caught by their checksums
    damaged.write_bytes(bytes(data))
    torn.write_bytes(torn.read_bytes()[:2000])
    (damaged.parent / f".seg_r0_{'0' * 12}.h5.tmp123").write_bytes(b"half-written")
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "logs/embed/rank_0.log").read_text()
    assert re.search(rf"discarding store segment .*{torn.name} \(unreadable", log)
    assert damaged.name in log and not damaged.exists() and not half_written(tmp_path)
    assert_same_embeddings(tmp_path, clean1)


def test_a_damaged_or_missing_shard_is_redone_by_its_rank_before_the_merge(tmp_path, fasta, tiny_checkpoint, clean2):
    """A shard torn, replaced or deleted after its job: the next run reruns that rank (from the
    store, no model loaded), then merges; the aggregation never writes a rank's files."""
    config = config_for(fasta, tiny_checkpoint, world_size=2)
    shutil.copytree(clean2, tmp_path, symlinks=True, dirs_exist_ok=True)  # a finished run (times kept)
    shard = tmp_path / "results/shards/shard_1.h5"
    tear = lambda: shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # noqa: E731
    # (a deleted shard is an intermediate file: Snakemake redoes it once the merge must run again)
    for damage, extra in ((tear, ()), (shard.unlink, ("--forcerun", "aggregate"))):
        damage()
        result = run_snakemake(tmp_path, {**config, "require_complete": True}, *extra)
        assert result.returncode == 0, result.stderr
        assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
        assert rank_status(tmp_path, 1)["embedded"] == 0 and "loaded in" not in rank_log(tmp_path, 1)
        assert json.loads((tmp_path / "results/manifest.json").read_text())["complete"]
        assert_same_embeddings(tmp_path, clean2)
    # torn without the store too: the rank computes its sequences again, in the same run
    tear()
    for segment in segment_files(tmp_path):
        segment.unlink()
    result = run_snakemake(tmp_path, {**config, "require_complete": True})
    assert result.returncode == 0, result.stderr
    assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
    assert rank_status(tmp_path, 1)["embedded"] == len(planned_ids(tmp_path, 1))
    assert_same_embeddings(tmp_path, clean2)
    assert "Nothing to be done" in run_snakemake(tmp_path, {**config, "require_complete": True}).stderr


def test_a_garbled_status_file_is_a_rank_to_redo_never_fatal(tmp_path, fasta, tiny_checkpoint, clean2):
    config = config_for(fasta, tiny_checkpoint, world_size=2)
    shutil.copytree(clean2, tmp_path, symlinks=True, dirs_exist_ok=True)  # a finished run (times kept)
    status = tmp_path / "results/status/rank_0.json"
    status.write_text(status.read_text()[:25])
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "wildcards: rank=0" in result.stderr
    assert rank_status(tmp_path, 0)["ok"] and "loaded in" not in rank_log(tmp_path, 0)
    assert_same_embeddings(tmp_path, clean2)
    assert "Nothing to be done" in run_snakemake(tmp_path, config).stderr
    # read by the aggregation itself (as if the Snakefile had not seen it): a failed rank, named
    status.write_bytes(b"\xff\xfe garbage")
    manifest = aggregate_in_process(tmp_path, config)
    (failed,) = manifest["ranks_failed"]
    assert failed["rank"] == 0 and failed["error"].startswith(f"status file {status} is unreadable")


def test_store_rows_gone_or_damaged_under_a_finished_run_are_computed_again_never_read(
    tmp_path, tiny_checkpoint, monkeypatch
):
    """Per-residue rows stay in the store, where the shards read them: a segment deleted under a
    finished run makes the next run redo the ranks that read it, before merging (also when only
    a merge setting changed); one damaged in place fails its checksums while merging: the rank is
    rejected, never read as NaN or zeros, and the next run redoes it after checking its segments."""
    write_fasta(tmp_path / "p.fasta", random_sequences(300, seed=5, median=120))
    config = config_for(
        tmp_path / "p.fasta", tiny_checkpoint, world_size=2, pooling=["mean", "per_residue"], segment_sequences=50
    )
    completed_run(tmp_path, config)
    reference = tmp_path / "reference.h5"
    reference.write_bytes((tmp_path / "results/embeddings.h5").read_bytes())
    # merged again in blocks of 64 KiB, its per-residue rows written in 8 KiB pieces, with and
    # without O_DIRECT: the same file
    for direct in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(aggregate_module, "_BLOCK_BYTES", 64 << 10)
            patch.setattr(aggregate_module, "_STAGE_BYTES", 8 << 10)
            patch.setattr(aggregate_module, "DIRECT_WRITES", direct)
            assert aggregate_in_process(tmp_path, config)["complete"]
        assert_same_outputs(tmp_path, reference)
    gone = [segment for segment in segment_files(tmp_path) if segment.name.startswith("seg_r1_")][1]
    gone.unlink()
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
    assert 0 < rank_status(tmp_path, 1)["embedded"] <= 50  # only the lost segment's sequences
    assert json.loads((tmp_path / "results/manifest.json").read_text())["complete"]
    assert_same_outputs(tmp_path, reference)
    # the whole store deleted, then a setting that only changes the merge: every rank is redone
    # before the merge, and the complete embeddings.h5 is never lost
    shutil.rmtree(tmp_path / "results/store")
    merge_only = {**config, "compression": "gzip", "require_complete": True}
    result = run_snakemake(tmp_path, merge_only)
    assert result.returncode == 0, result.stderr
    assert rank_status(tmp_path, 0)["embedded"] + rank_status(tmp_path, 1)["embedded"] == 300
    assert_same_outputs(tmp_path, reference)
    # Damaged in place: its checksums fail while merging; the rank is rejected (the aggregation
    # deletes nothing), the merge goes on without it, and the next run redoes exactly that rank.
    damaged = [segment for segment in segment_files(tmp_path) if segment.name.startswith("seg_r1_")][0]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)  # per-residue values: most of the file
    damaged.write_bytes(bytes(data))
    result = run_snakemake(tmp_path, config, "--forcerun", "aggregate")
    assert result.returncode == 0, result.stderr
    assert re.search(r"rank 1: .*shard.* \(.*filter returned failure.*\); it counts as failed", result.stderr)
    manifest = json.loads((tmp_path / "results/manifest.json").read_text())
    (rejected,) = manifest["ranks_failed"]
    assert rejected["rank"] == 1 and rejected["rejected"] and 0 < manifest["missing"] < 300
    ids, rows, _ = read_embeddings(tmp_path / "results/embeddings.h5", "per_residue/layer_2")
    assert len(ids) == 300 - manifest["missing"] and np.isfinite(rows).all()
    assert damaged.exists()  # the aggregation only reads
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "wildcards: rank=1" in result.stderr and "wildcards: rank=0" not in result.stderr
    assert not damaged.exists() and 0 < rank_status(tmp_path, 1)["embedded"] <= 50
    assert_same_outputs(tmp_path, reference)
    assert "Nothing to be done" in run_snakemake(tmp_path, config).stderr
    # Gone while the merge reads it (HDF5 would give its rows as NaN): rejected, never NaN.
    lost = [segment for segment in segment_files(tmp_path) if segment.name.startswith("seg_r1_")][0]
    read_rows = aggregate_module._read_rows

    def read_rows_losing_a_segment(dataset, rows):
        lost.unlink(missing_ok=True)
        return read_rows(dataset, rows)

    monkeypatch.setattr(aggregate_module, "_read_rows", read_rows_losing_a_segment)
    manifest = aggregate_in_process(tmp_path, config)
    assert [failed["rank"] for failed in manifest["ranks_failed"]] == [1]
    assert (
        f"store segment ../store/{lost.parent.name}/{lost.name} went while the merge read it"
        in manifest["ranks_failed"][0]["error"]
    )
    ids, rows, _ = read_embeddings(tmp_path / "results/embeddings.h5", "per_residue/layer_2")
    assert len(ids) == 300 - manifest["missing"] and np.isfinite(rows).all()


def aggregate_in_process(workdir: Path, config: dict) -> dict:
    """The aggregate job's work on a finished run's files (what workflow/scripts/aggregate.py calls)."""
    results = workdir / "results"
    world_size = config["world_size"]
    return aggregate_module.aggregate(
        results / "index",
        results / "plan.h5",
        [results / f"shards/shard_{r}.h5" for r in range(world_size)],
        [results / f"status/rank_{r}.json" for r in range(world_size)],
        RankSettings.from_config(config),
        results / "embeddings.h5",
        results / "manifest.json",
        results / "missing_ids.txt",
    )


def assert_same_outputs(workdir: Path, reference: Path) -> None:
    for name in ("mean/layer_2", "per_residue/layer_2"):
        assert (
            read_embeddings(workdir / "results/embeddings.h5", name)[1].tobytes()
            == read_embeddings(reference, name)[1].tobytes()
        )


def test_a_failed_attempt_loses_no_computed_work(tmp_path, tiny_checkpoint):
    """Snakemake deletes a failed job's outputs (the shard, here renamed into place just before
    the kill); the work lives on in the store, so the rerun assembles the shard from it, computing nothing."""
    small = write_fasta(tmp_path / "small.fasta", random_sequences(300, seed=4, median=100))
    config = config_for(small, tiny_checkpoint, world_size=1)
    crashed = run_snakemake(tmp_path, config, env={"ESMSHARD_CRASH_AT": "shard-renamed"})
    assert crashed.returncode != 0 and "Removing output files of failed job embed" in crashed.stderr
    assert not (tmp_path / "results/shards/shard_0.h5").exists() and segment_files(tmp_path)
    result = run_snakemake(tmp_path, config)
    assert result.returncode == 0, result.stderr
    assert "loaded in" not in rank_log(tmp_path, 0) and rank_status(tmp_path)["embedded"] == 0
    assert json.loads((tmp_path / "results/manifest.json").read_text())["reused"] == 300


def test_a_changed_model_never_reuses_stale_work(tmp_path, fasta, tiny_checkpoint):
    """Work stopped under one model is not the other's (changed layers: test_rerun.py)."""
    from esmshard.model import write_random_checkpoint

    config = config_for(fasta, tiny_checkpoint, world_size=1)
    stop_after_first_segment(tmp_path, config)
    assert segment_files(tmp_path)
    changed = {**config, "model": str(write_random_checkpoint(tmp_path / "other.pt", 2, 32, 4, seed=9))}
    stop_after_first_segment(tmp_path, changed)
    assert "; 0 already in the store" in (tmp_path / "logs/embed/rank_0.log").read_text()
    result = run_snakemake(tmp_path, changed)
    assert result.returncode == 0, result.stderr
    assert rank_status(tmp_path)["residues_computed"] < rank_status(tmp_path)["residues"]  # its own work reused
    _, _, attrs = read_embeddings(tmp_path / "results/embeddings.h5")
    assert attrs["model"] == changed["model"]


def test_timeout_stops_the_rank_keeps_its_work_and_counts_it_failed(tmp_path, tiny_checkpoint):
    fasta = write_fasta(tmp_path / "proteins.fasta", random_sequences(400, seed=3, median=120))
    # 40 batches of a slow GPU (0.4 s each, ESMSHARD_BATCH_SECONDS): 16 s of work, which the rank
    # cannot finish in its 8 seconds, saved every 20 sequences (some even on a busy machine)
    config = config_for(fasta, tiny_checkpoint, world_size=1, segment_sequences=20, tokens_per_batch=1400)
    (tmp_path / "timed").mkdir()
    result = run_snakemake(tmp_path / "timed", {**config, "timeout": "8s"}, env={"ESMSHARD_BATCH_SECONDS": "0.4"})
    assert result.returncode != 0
    assert "no rank succeeded" in result.stderr and "TimedOut" in result.stderr
    assert rank_status(tmp_path / "timed")["ok"] is False
    assert segment_files(tmp_path / "timed")
    result = run_snakemake(tmp_path / "timed", config)
    assert result.returncode == 0, result.stderr
    assert 0 < rank_status(tmp_path / "timed")["residues_computed"] < rank_status(tmp_path / "timed")["residues"]
    (tmp_path / "clean").mkdir()
    completed_run(tmp_path / "clean", config)
    assert_same_embeddings(tmp_path / "timed", tmp_path / "clean")


@pytest.mark.parametrize(
    "text, seconds",
    [
        (90, 90.0),
        ("90s", 90.0),
        ("45m", 2700.0),
        ("12h", 43200.0),
        ("11h30m", 41400.0),
        ("1d", 86400.0),
        ("1:30:00", 5400.0),
        (None, None),
    ],
)
def test_durations(text, seconds):
    from esmshard.stopping import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["1.2.3", ":", -5, 0, "0s", "abc", "", "5x", True])
def test_bad_durations_are_named(text):
    from esmshard.stopping import parse_duration

    with pytest.raises(ValueError, match=r"^timeout: .* is not a duration; give seconds \(> 0\)"):
        parse_duration(text)
