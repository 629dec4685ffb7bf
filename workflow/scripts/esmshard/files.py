"""Writing files so that a reader never sees half of one: atomic renames and space checks.
Standard library only: the Snakefile's helpers use it while the workflow is parsed."""

import contextlib
import os
import shutil
from pathlib import Path

from esmshard import EsmShardError


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; rename it into place only on success.

    A reader never sees a half-written file, and a failure leaves whatever was at ``path``
    before untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_space(directory, nbytes: int, what: str) -> None:
    """Raise, naming the directory, unless ``nbytes`` (and some room for HDF5's own structures)
    fit there: HDF5 handles a full disk badly, and a clear failure beats a torn write."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < nbytes * 1.05 + (4 << 20):
        raise EsmShardError(
            f"no space left on {directory}: {what} needs {nbytes / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free"
        )
