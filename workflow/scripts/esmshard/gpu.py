"""Which GPUs this process may use, and an exclusive lease on one of them.

No CUDA here: everything must happen before torch initialises CUDA, since
CUDA_VISIBLE_DEVICES is read only then.
"""

import fcntl
import functools
import logging
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from esmshard import EsmShardError

log = logging.getLogger(__name__)

# The signals whose handlers (installed by the caller) raise to stop the rank, also while it waits.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)


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
    return list(_nvidia_smi_gpus())


@functools.cache
def _nvidia_smi_gpus() -> tuple[str, ...]:
    """The host's GPUs as nvidia-smi lists them, asked once per process (each call takes ~0.3 s)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def gpu_device() -> str:
    """'cuda' when this process will compute on a GPU, else 'cpu', without starting CUDA: some GPU
    visible, and an NVIDIA driver on the host (CUDA_VISIBLE_DEVICES alone can name GPUs that are not there)."""
    driver = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    return "cuda" if visible_gpus() and driver else "cpu"


def count_visible_gpus() -> int:
    return len(visible_gpus())


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


class GpuLease:
    """The GPU this process uses (None: the CPU) and, when leased, the open lock file that holds it.

    Nothing releases the flock early: it lasts until the process exits, however it exits. The
    module keeps every lease (``_HELD``), since closing the file (as garbage collection would,
    once the caller drops the lease) drops the flock and lets another rank take the same GPU.
    """

    def __init__(self, gpu: str | None, handle):
        self.gpu = gpu
        self._handle = handle
        if handle is not None:
            _HELD.append(self)


_HELD: list[GpuLease] = []


def pin_gpu(lock_dir, poll_seconds: float = 5.0) -> GpuLease:
    """Choose this process's GPU and set CUDA_VISIBLE_DEVICES to it.

    Inside a SLURM job the allocation's CUDA_VISIBLE_DEVICES is kept as it is. Otherwise one
    visible GPU is leased through a per-GPU flock in lock_dir, shared by every esmshard process
    of every user on the host, so two ranks never share a GPU; when all are leased this waits
    for one. With no GPU the process runs on the CPU. An unusable lock_dir raises EsmShardError.
    """
    if in_slurm_job() and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return GpuLease(os.environ["CUDA_VISIBLE_DEVICES"], None)
    gpus = visible_gpus()
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return GpuLease(None, None)
    lock_dir = Path(lock_dir)
    _make_lock_dir(lock_dir)
    try:
        gpu, handle = _lease(lock_dir, gpus, poll_seconds)
    except OSError as error:
        raise _unusable(lock_dir, f"{error.strerror} ({error.filename})") from None
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return GpuLease(gpu, handle)


def _make_lock_dir(lock_dir: Path) -> None:
    try:
        lock_dir.mkdir(parents=True)
    except FileExistsError:
        pass  # an earlier run's, perhaps another user's (or not a directory: checked below)
    except OSError as error:
        raise _unusable(lock_dir, f"cannot create it: {error.strerror} ({error.filename})") from None
    else:
        # Every user of the host leases GPUs here: writable by all and sticky, like /tmp. Set with
        # chmod because the umask strips these bits from mkdir's mode.
        os.chmod(lock_dir, 0o1777)
    if not lock_dir.is_dir():
        raise _unusable(lock_dir, "is not a directory")


def _lease(lock_dir: Path, gpus: list[str], poll_seconds: float):
    """Wait until one of gpus is free and flock it; return it and its open lock file.

    Every other lock file is closed however this ends, also when a signal handler's exception
    interrupts the wait, so no lock is left held by an abandoned wait.
    """
    handles = {}
    try:
        for gpu in gpus:
            handles[gpu] = _open_lock(lock_dir / f"gpu-{gpu}.lock")
        waited = False
        while True:
            for gpu, handle in handles.items():
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another rank's, of this user or another
                if handle.writable():  # for whoever wonders who holds the GPU
                    handle.seek(0)
                    handle.truncate()
                    handle.write(f"{os.getpid()}\n")
                    handle.flush()
                return gpu, handles.pop(gpu)
            if not waited:
                _log_waiting(len(gpus))
                waited = True
            time.sleep(poll_seconds)
    finally:
        for handle in handles.values():
            handle.close()  # closing the file drops its flock, if it was taken


def _log_waiting(count: int) -> None:
    # Logging catches any exception raised while it writes (Handler.handleError), so the
    # exception of a stop signal's handler would be lost there and the wait go on: hold the stop
    # signals until the message is written; one that came meanwhile is handled right after.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        log.info("all %d visible GPUs are leased by other ranks; waiting for one", count)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _open_lock(path: Path):
    """Open a GPU's lock file, creating it (writable by every user) when there is none.

    An existing file is opened without O_CREAT: with fs.protected_regular the kernel refuses
    O_CREAT on another user's file in a sticky directory. A file this user cannot write (another
    user's, or one an older esmshard created 0644) is opened read-only: flock needs no write access.
    """
    while True:
        try:
            return open(path, "r+")
        except FileNotFoundError:
            pass
        except PermissionError:
            return open(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue  # another rank created it just now
        except PermissionError:
            problem = f"has no {path.name} and user {_user()} may not create files in it"
            raise _unusable(path.parent, problem) from None
        os.fchmod(fd, 0o666)  # the umask stripped other users' write permission
        return os.fdopen(fd, "r+")


def _unusable(lock_dir: Path, problem: str) -> EsmShardError:
    return EsmShardError(
        f"gpu_lock_dir {lock_dir}: {problem}; set gpu_lock_dir in the config to a directory "
        "that every user running esmshard on this host can write"
    )


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a passwd entry, as in some containers
        return f"uid {os.geteuid()}"
