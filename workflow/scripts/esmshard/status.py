"""A rank's outcome, as the workflow, the aggregation and the report read it.

Every rank ends with a status file (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``),
an output of the embed rule next to its shard. A failed status (the rank's last attempt failed, or
its shard was found damaged later) makes the next run of the workflow retry exactly that rank,
whatever rerun triggers it uses: the embed rule then asks for an input named after that failure,
which rule retry_rank makes. Standard library only: the Snakefile reads statuses while it builds its jobs.
"""

import json
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


def retry_failure(path) -> str | None:
    """The failure whose retry marker the rank needs as an input: the one its status records,
    which makes the next run retry it; after the retry, the same one (so that the retried rank is
    up to date); None for a rank that never failed."""
    try:
        status = read_status(path)
    except (OSError, ValueError):
        return None
    return status.get("failure", "unknown") if status.get("ok") is not True else status.get("retried")


def record_failure(status_path, rank: int, error, attempt: int, **where) -> str:
    """The rank failed (on its last attempt, or its shard was found damaged later): the next run
    retries it. Returns the error as recorded."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    write_status(status_path, rank=rank, ok=False, attempt=attempt, error=message, failure=secrets.token_hex(4),
                 **where)
    return message
