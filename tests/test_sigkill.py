"""SIGKILL at random moments of a run, then reruns: the embeddings must be bit-identical to an
uninterrupted run's. In a file of its own (one of the suite's longest tests): pytest-xdist gives
whole files to its workers, so this one runs beside test_resume.py instead of after it."""

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import assert_same_embeddings, run_snakemake
from crashes import (  # noqa: F401 (fixtures)
    clean2,
    config_for,
    embed_processes,
    fasta,
    half_written,
    phase_of,
    rank_of,
    segment_files,
    start_snakemake,
    wait_for,
)

# Random kills per run of the suite (the three exact crash points below come on top): 8 reach every
# phase within a few runs; ESMSHARD_KILLS=100 for a long hunt.
RANDOM_KILLS = int(os.environ.get("ESMSHARD_KILLS", 8))

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast


def test_sigkill_at_random_moments_then_rerun_gives_identical_embeddings(tmp_path, fasta, tiny_checkpoint, clean2):
    rng = random.Random(20261128)
    config = config_for(fasta, tiny_checkpoint, world_size=2)
    kills, reruns, rounds, rows, phases = 0, 0, 0, 0, Counter()
    while kills < RANDOM_KILLS:
        rounds += 1
        workdir = tmp_path / f"round{rounds}"
        workdir.mkdir()
        while kills < RANDOM_KILLS:
            process = start_snakemake(workdir, config)
            reruns += 1
            wait_for(lambda w=workdir, p=process: embed_processes(w) or p.poll() is not None)
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0.0, 2.5))  # while the rank starts up and loads the model
            else:  # while it embeds: after a segment of this run, before or during the next
                written = set(segment_files(workdir))
                wait_for(lambda w=workdir, p=process, s=written: set(segment_files(w)) - s or p.poll() is not None)
                time.sleep(rng.uniform(0.0, 0.3))
            victims = embed_processes(workdir)
            if not victims:  # no rank running: the run is at its end (its last rule, or done)
                assert process.wait(timeout=300) == 0, process.stderr.read()
                break
            for victim in rng.sample(victims, rng.randint(1, len(victims))):  # one rank, or both at once
                log = workdir / f"logs/embed/rank_{rank_of(victim, workdir)}.log"
                os.kill(victim, signal.SIGKILL)
                kills += 1
                phases[phase_of(log.read_text()) if log.exists() else "starting up / loading the model"] += 1
            process.wait(timeout=300)
        finished = run_snakemake(workdir, config)
        reruns += 1
        assert finished.returncode == 0, finished.stderr
        rows += assert_same_embeddings(workdir, clean2)
        assert not half_written(workdir)  # a killed write's temporary is gone once its rank reran
    # and at the exact moments a random kill rarely hits, one after the other on one run (each
    # rerun resumes from what the one before left): a segment written but not yet renamed, the
    # shard written but not renamed, the shard renamed but its status not yet written
    rounds += 1
    workdir = tmp_path / "crash-points"
    workdir.mkdir()
    for point in ("segment-written", "shard-written", "shard-renamed"):
        crashed = run_snakemake(workdir, config, env={"ESMSHARD_CRASH_AT": point})
        reruns += 1
        assert crashed.returncode != 0 and "SIGKILL" in crashed.stderr
        kills += 1
        phases[point] += 1
    rerun = run_snakemake(workdir, config)
    reruns += 1
    assert rerun.returncode == 0, rerun.stderr
    rows += assert_same_embeddings(workdir, clean2)
    assert not half_written(workdir)
    summary = {
        "kills": kills,
        "snakemake runs": reruns,
        "rounds": rounds,
        "rows compared": rows,
        "mismatches": 0,
        "kill phases": dict(phases),
    }
    print("kill test:", json.dumps(summary))
    (Path(os.environ.get("ESMSHARD_KILL_REPORT", tmp_path / "kill_report.json"))).write_text(json.dumps(summary))
