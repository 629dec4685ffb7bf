"""Helpers of the crash tests (test_resume.py, test_sigkill.py): their input and its uninterrupted
run (fixtures, which each test module imports), snakemake started in the background, its rank
processes found and killed, the store's files."""

import os
import subprocess
import time
from pathlib import Path

import pytest

import conftest
from conftest import completed_run, random_sequences, write_fasta

CRASH_PROTEINS = 600  # ~10 segments per rank of 2: many points to stop at, ~0.8 s of compute each
SEGMENT = 30


def config_for(fasta, model, **extra):
    """Small segments (many kill points); no --retries (Snakemake's default 0): a kill is recovered by the rerun."""
    return conftest.config_for(fasta, model, **{"segment_sequences": SEGMENT, **extra})


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    records = random_sequences(CRASH_PROTEINS, seed=3, median=120)
    return write_fasta(tmp_path_factory.mktemp("input") / "proteins.fasta", records)


@pytest.fixture(scope="module")
def clean2(tmp_path_factory, fasta, tiny_checkpoint):
    return completed_run(tmp_path_factory.mktemp("clean2"), config_for(fasta, tiny_checkpoint, world_size=2))


def start_snakemake(workdir: Path, config: dict, start_new_session: bool = False) -> subprocess.Popen:
    """Snakemake running in the background, to be killed at will (``start_new_session``: in a
    process group of its own, with its jobs, as a terminal's foreground command is)."""
    command, env = conftest.snakemake_command(workdir, config)
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )


def rank_of(pid: int, workdir: Path) -> str:
    """Which rank a job process is: the rank log it holds open."""
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith(str(workdir / "logs/embed/rank_")):
                return target.rsplit("_", 1)[1].split(".")[0]
    except OSError:
        pass
    return "?"


def embed_processes(workdir: Path) -> list[int]:
    """PIDs of the workflow's running embed jobs (the rank processes)."""
    marker = f"{workdir}/.snakemake/scripts/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if marker in cmdline and b"embed.py" in cmdline and entry.name.isdigit():
            pids.append(int(entry.name))
    return pids


def wait_for(condition, timeout: float = 60, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def segment_files(workdir: Path) -> list[Path]:
    """The store's segments: the finished work of every rank, kept by content."""
    return sorted((workdir / "results/store").glob("*/seg_*.h5"))


def half_written(workdir: Path) -> list[Path]:
    return sorted((workdir / "results/store").glob("*/.seg_*"))


def phase_of(log_text: str) -> str:
    last = log_text.strip().splitlines()[-1] if log_text.strip() else ""
    if "assembling" in last:
        return "assembling the shard"
    if "wrote seg_" in last:
        return "after a segment write"
    if "sequences (" in last or "batches of at most" in last:
        return "embedding"
    return "starting up / loading the model"
