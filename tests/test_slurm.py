"""The workflow through profiles/slurm on a real single-node SLURM cluster started on this machine
(tests/slurm/start.sh: slurmctld, slurmd and munge from Debian, four fake GPUs)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import (
    REPO,
    SLURM_PLUGINS,
    assert_same_embeddings,
    completed_run,
    random_sequences,
    snakemake_command,
    write_fasta,
)

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

SLURM_SCRIPTS = REPO / "tests" / "slurm"


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    # outside pytest's private temporary directories: munged runs as the munge user
    state = Path(os.environ.get("ESMSHARD_SLURM_STATE", "/tmp/esmshard-slurm"))
    started = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start.sh"), str(state)], capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        message = f"SLURM could not be started here: {started.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # never skipped silently in CI
        pytest.skip(message)
    conf = re.search(r"export SLURM_CONF=(\S+)", started.stdout)[1]
    yield conf
    subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh"), str(state)], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("input") / "proteins.fasta", random_sequences(400, seed=21, median=120))


def through_slurm(workdir: Path, config: dict, slurm_conf: str, env: dict | None = None):
    """snakemake --profile profiles/slurm, with the placeholders filled in for the test cluster."""
    command, full_env = snakemake_command(
        workdir,
        config,
        "--profile",
        str(REPO / "profiles/slurm"),
        "--default-resources",
        "slurm_account=test",
        "slurm_partition=debug",
        "runtime=10",
        "mem_mb=1000",
        "--set-resources",
        "embed:slurm_partition=debug",
        "embed:cpus_per_task=2",
        "embed:mem_mb=1000",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--jobs",
        "8",
        # the plugin for snakemake, and for the jobs (sbatch passes the environment on)
        env={"SLURM_CONF": slurm_conf, "PYTHONPATH": python_path_with(SLURM_PLUGINS), **(env or {})},
        targets=(),
    )
    full_env.pop("CUDA_VISIBLE_DEVICES", None)  # the jobs' GPUs are SLURM's to give
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=900)


def python_path_with(folder: Path) -> str:
    return os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))


def statuses(workdir: Path, ranks: int) -> list[dict]:
    return [json.loads((workdir / f"results/status/rank_{r}.json").read_text()) for r in range(ranks)]


def test_four_ranks_as_four_slurm_jobs_on_one_gpu_each_a_failed_one_and_the_rerun(
    tmp_path, fasta, tiny_checkpoint, slurm_conf
):
    """One run whose rank 1 fails on both its attempts, then the same command again: each rank is
    its own SLURM job on exactly one GPU, the rerun submits only rank 1 and the aggregation, and
    the result is a local run's."""
    config = {"fasta": [str(fasta)], "model": str(tiny_checkpoint), "world_size": 4, "threads_per_rank": 2}
    (tmp_path / "slurm").mkdir()
    workdir = tmp_path / "slurm"
    first = through_slurm(workdir, config, slurm_conf, env={"ESMSHARD_FAIL_RANKS": "1"})
    assert first.returncode == 0, first.stderr[-5000:]
    # index and plan as one job, each rank its own, rank 1 twice, the aggregation
    assert len(re.findall(r"submitted with SLURM jobid", first.stderr)) == 1 + 4 + 1 + 1, first.stderr[-5000:]
    manifest = json.loads((workdir / "results/manifest.json").read_text())
    assert [f["rank"] for f in manifest["ranks_failed"]] == [1] and manifest["ranks_succeeded"] == [0, 2, 3]
    assert "fault injected" in manifest["ranks_failed"][0]["error"]
    log = (workdir / "logs/embed/rank_1.log").read_text()  # retries: 1 of the profile reached the SLURM job
    assert "attempt 2 of 2" in log and "failed on its last attempt (2)" in log
    before = {r: (workdir / f"results/shards/shard_{r}.h5").stat().st_mtime_ns for r in (0, 2, 3)}
    second = through_slurm(workdir, config, slurm_conf)
    assert second.returncode == 0, second.stderr[-5000:]
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", second.stderr)
    assert len(submitted) == 2, second.stderr[-5000:]  # rank 1 and the aggregation, nothing else
    assert "wildcards: rank=1" in second.stderr
    assert {r: (workdir / f"results/shards/shard_{r}.h5").stat().st_mtime_ns for r in (0, 2, 3)} == before
    assert json.loads((workdir / "results/manifest.json").read_text())["complete"]
    ranks = statuses(workdir, 4)
    job_ids = [status["slurm_job_id"] for status in ranks]
    assert all(job_ids) and len(set(job_ids)) == 4  # each rank its own SLURM job
    for status in ranks:
        assert re.fullmatch(r"\d", status["cuda_visible_devices"])  # exactly one GPU index, set by SLURM
    (tmp_path / "local").mkdir()
    completed_run(tmp_path / "local", {**config, "world_size": 1})
    assert_same_embeddings(workdir, tmp_path / "local", atol=1e-5)  # as test_one_rank_equals_three_ranks
