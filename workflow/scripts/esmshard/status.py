"""A rank's outcome, as the workflow, the aggregation and the report read it.

Every rank ends with a status file (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``),
an output of the embed rule next to its shard. A failed status (the rank's last attempt failed, or
its shard was found damaged later) makes the next run of the workflow retry exactly that rank,
whatever rerun triggers it uses: the embed rule then asks for an input named after that failure,
which rule retry_rank makes. So does a store segment lost under a merged file that refers to it
(``per_residue_in_embeddings: refer``; the manifest lists the segments of each rank's rows).
Standard library only: the Snakefile reads statuses and the manifest while it builds its jobs.
"""

import functools
import hashlib
import json
import os
import secrets
from pathlib import Path

from esmshard import atomic_output


def write_status(path, **status) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(status, indent=2) + "\n")


def read_status(path) -> dict:
    return json.loads(Path(path).read_text())


def failed(path) -> bool:
    """Whether the status at ``path`` records a failure (False when there is no status yet)."""
    try:
        return read_status(path).get("ok") is not True
    except (OSError, ValueError):
        return False


def retry_failure(path, lost=()) -> str | None:
    """The failure whose retry marker the rank needs as an input: the one its status records, or
    else the loss of the store segments ``lost`` (``lost_segments``), which makes the next run retry it;
    after the retry, the same one (so that the retried rank is up to date); None for a rank that
    never failed."""
    try:
        status = read_status(path)
    except (OSError, ValueError):
        return None
    if status.get("ok") is not True:
        return status.get("failure", "unknown")
    if lost:
        return "lost" + hashlib.sha256("\n".join(sorted(lost)).encode()).hexdigest()[:8]
    return status.get("retried")


def lost_segments(manifest_path, rank) -> list[str]:
    """The store segments holding rank ``rank``'s rows that the merged file of ``manifest_path``
    refers to and that no longer exist (none where the merged file holds its own copy)."""
    try:
        referred = _referred_segments(str(manifest_path), os.stat(manifest_path).st_mtime_ns)
    except (OSError, ValueError):
        return []
    folder = Path(manifest_path).parent
    return [name for name in referred.get(str(rank), []) if not (folder / name).is_file()]


@functools.lru_cache(maxsize=4)
def _referred_segments(manifest_path: str, mtime_ns: int) -> dict:
    """The manifest's store segments by rank, read once per version of the file: the Snakefile asks
    for every rank, and the manifest also lists every missing ID of a failed rank."""
    return json.loads(Path(manifest_path).read_text()).get("store_segments_by_rank", {})


def record_failure(status_path, rank: int, error, attempt: int, **where) -> str:
    """The rank failed (on its last attempt, or its shard was found damaged later): the next run
    retries it. Returns the error as recorded."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    write_status(
        status_path, rank=rank, ok=False, attempt=attempt, error=message, failure=secrets.token_hex(4), **where
    )
    return message
