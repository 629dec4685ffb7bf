"""GPU leases (esmshard.gpu.pin_gpu) with real devices: processes never share a GPU, and each sees
exactly one device in torch. Needs 2 GPUs or more."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import config_for, random_sequences, snakemake_command, write_fasta
from esmshard.gpu import visible_gpus

RANK = textwrap.dedent(
    """
    import gc, json, os, sys
    from esmshard.gpu import pin_gpu
    gpu = pin_gpu(sys.argv[1], poll_seconds=0.1).gpu  # as a rank does: the lease object is not kept
    gc.collect()
    import torch
    seen = {"gpu": gpu, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
            "count": torch.cuda.device_count(), "uuid": str(torch.cuda.get_device_properties(0).uuid)}
    print(json.dumps(seen), flush=True)
    sys.stdin.read()  # hold the lease until the test closes stdin
    """
)


@pytest.fixture
def two_gpus(cuda):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, torch sees {torch.cuda.device_count()}")


def start_rank(lock_dir, **env):
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env}
    full_env.pop("SLURM_JOB_ID", None)  # inside SLURM, pin_gpu keeps the allocation instead
    return subprocess.Popen(
        [sys.executable, "-c", RANK, str(lock_dir)],
        env=full_env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def report(rank) -> dict:
    line = rank.stdout.readline()
    if not line:
        rank.wait(timeout=60)
        pytest.fail(f"the rank exited ({rank.returncode}) without a lease: {rank.stderr.read()[-2000:]}")
    return json.loads(line)


def finish(*ranks):
    for rank in ranks:
        rank.stdin.close()
    for rank in ranks:
        assert rank.wait(timeout=60) == 0, rank.stderr.read()[-2000:]


def test_two_processes_get_different_gpus_and_see_one_each(two_gpus, tmp_path):
    ranks = [start_rank(tmp_path), start_rank(tmp_path)]
    try:
        first, second = (report(rank) for rank in ranks)
    finally:
        finish(*ranks)
    assert first["gpu"] != second["gpu"] and first["uuid"] != second["uuid"]
    for leased in (first, second):
        assert leased["gpu"] in visible_gpus() and leased["visible"] == leased["gpu"] and leased["count"] == 1


def test_a_cuda_visible_devices_subset_is_honoured(two_gpus, tmp_path):
    second_gpu = visible_gpus()[1]  # what this process sees as cuda:1
    rank = start_rank(tmp_path, CUDA_VISIBLE_DEVICES=second_gpu)
    try:
        leased = report(rank)
    finally:
        finish(rank)
    assert leased == {
        "gpu": second_gpu,
        "visible": second_gpu,
        "count": 1,
        "uuid": str(torch.cuda.get_device_properties(1).uuid),
    }


def test_two_ranks_of_a_run_compute_on_two_gpus_at_once(two_gpus, tmp_path, tiny_checkpoint):
    """The workflow's own ranks, at once: each keeps its lease while it computes (a lease dropped
    early once let every rank take the first GPU)."""
    pytest.importorskip("snakemake")
    fasta = write_fasta(tmp_path / "proteins.fasta", random_sequences(400, seed=2))
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = config_for(fasta, tiny_checkpoint, world_size=2, gpu_lock_dir=str(tmp_path / "locks"))
    command, env = snakemake_command(
        workdir, config, "--resources", "gpu=2", cores=4, env={"CUDA_VISIBLE_DEVICES": ",".join(visible_gpus())}
    )
    command[:1] = [sys.executable, "-m", "snakemake"]  # wherever snakemake is installed
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = [json.loads((workdir / f"results/status/rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(status["gpu"] for status in statuses) == sorted(visible_gpus()[:2])
