"""Which GPUs this process may use, and an exclusive lease on one of them.

No CUDA here: everything must happen before torch initialises CUDA, since
CUDA_VISIBLE_DEVICES is read only then.
"""

import fcntl
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_LOCK_DIR = "/tmp/esmshard-gpu-locks"


def visible_gpus() -> list[str]:
    """GPU identifiers this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's.

    Entries are what CUDA_VISIBLE_DEVICES accepts (indices or UUIDs); an empty list means CPU.
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        entries = [e.strip() for e in env.split(",") if e.strip()]
        # CUDA ignores everything from the first invalid entry on (e.g. "-1" hides all GPUs).
        valid = []
        for entry in entries:
            if entry.startswith("-"):
                break
            valid.append(entry)
        return valid
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def count_visible_gpus() -> int:
    return len(visible_gpus())


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


class GpuLease:
    """The GPU this process uses (None: the CPU) and, when leased, the open lock file that holds it.

    Nothing releases the flock early: it lasts until the process exits, however it exits.
    """

    def __init__(self, gpu: str | None, handle):
        self.gpu = gpu
        self._handle = handle


def pin_gpu(lock_dir=DEFAULT_LOCK_DIR, poll_seconds: float = 5.0):
    """Choose this process's GPU and set CUDA_VISIBLE_DEVICES to it.

    Inside a SLURM job the allocation's CUDA_VISIBLE_DEVICES is kept as it is. Otherwise one
    visible GPU is leased through a per-GPU flock in lock_dir, shared by every esmshard process
    on the host, so two ranks never share a GPU; when all are leased this waits for one. With no
    GPU the process runs on the CPU.
    """
    if in_slurm_job() and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return GpuLease(os.environ["CUDA_VISIBLE_DEVICES"], None)
    gpus = visible_gpus()
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return GpuLease(None, None)
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu in gpus:
            handle = open(lock_dir / f"gpu-{gpu}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            return GpuLease(gpu, handle)
        if not waited:
            log.info("all %d visible GPUs are leased by other ranks; waiting for one", len(gpus))
            waited = True
        time.sleep(poll_seconds)
