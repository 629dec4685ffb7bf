"""A rank's outcome, as the workflow, the aggregation and the report read it.

Every rank ends with a status file, an output of the embed rule next to its shard: ``{"ok": true,
...}`` with the shard's size and time and the store segments its per-residue rows are read from,
or ``{"ok": false, "error": ..., "failure": <token>}``. The Snakefile reads each status while it
builds its jobs and retries a rank (``retry_failure``) whose status records a failure or cannot be
read, whose shard changed after its job, whose store segments are gone, or whose shard the last
aggregation rejected (the manifest says so): the embed rule then asks for an input named after
that failure, which rule retry_rank makes, so Snakemake reruns exactly that rank and, after it,
the aggregation, whatever rerun triggers it uses. The aggregation only reads. Standard library
only: the Snakefile imports this while it is parsed.
"""

import functools
import hashlib
import json
import os
import secrets
from pathlib import Path

from esmshard.files import atomic_output

_STAMP_BYTES = 64 << 10


def write_status(path, **status) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(status, indent=2) + "\n")


def write_success(path, shard_path, rank: int, stats: dict, **job) -> None:
    """The status of rank ``rank`` whose shard ``shard_path`` is complete: ``stats`` (the rank's
    figures, with the store segments its shard reads named from the status's folder, as the next
    run checks them), ``job`` (attempt, where it ran) and the shard's stamp."""
    segments = [os.path.relpath(segment, Path(path).parent) for segment in stats["store_segments"]]
    status = {"rank": rank, "ok": True, **job, "job": new_token(), **stats, "store_segments": segments}
    write_status(path, **status, shard=shard_stamp(shard_path))


def read_status(path) -> dict:
    """The status at ``path``; ValueError naming the file when it is not a status (damaged)."""
    return _parsed(Path(path).read_bytes(), path)


def _parsed(raw: bytes, path) -> dict:
    try:
        status = json.loads(raw)
    except ValueError as error:  # not UTF-8, or not JSON
        raise ValueError(f"status file {path} is unreadable ({error})") from None
    if not isinstance(status, dict) or not isinstance(status.get("ok"), bool):
        raise ValueError(f"status file {path} is unreadable (not an esmshard status)")
    return status


def failure_status(rank: int, error, attempt: int, **where) -> dict:
    """What a rank that failed for good records: the next run retries it."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"rank": rank, "ok": False, "attempt": attempt, "error": message, "failure": new_token(), **where}


def new_token() -> str:
    """A name for one job of a rank, or one failure: never the same twice."""
    return secrets.token_hex(4)


def shard_stamp(path) -> dict:
    """The shard's size and a digest of its first and last 64 KiB (where HDF5 keeps the file's
    structure and its attributes: the settings and the rank's share): a torn, replaced or foreign
    shard has another stamp. Not its time: Snakemake touches every output after its job."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        ends = os.pread(handle.fileno(), _STAMP_BYTES, 0) + os.pread(
            handle.fileno(), _STAMP_BYTES, max(0, size - _STAMP_BYTES)
        )
    return {"size": size, "ends": hashlib.sha256(ends).hexdigest()[:16]}


def retry_failure(status_path, shard_path, manifest_path, rank: int) -> str | None:
    """The failure whose retry marker rank ``rank`` needs as an input, or None for a rank that
    never failed (or has no status yet: then its job runs anyway). After the retry, the rank's
    status records the failure it was retried for (``retried``), which stays the answer until
    something new goes wrong; each answer names the job whose files went wrong (its status's
    ``job``, or for a status damaged, when that happened), so that the same damage twice is two
    failures."""
    try:
        raw, changed = Path(status_path).read_bytes(), os.stat(status_path).st_mtime_ns
    except FileNotFoundError:
        return None
    try:
        status = _parsed(raw, status_path)
    except ValueError:
        return "unreadable" + _digest(raw + str(changed).encode())
    if not status["ok"]:
        return str(status.get("failure") or "failed" + _digest(raw))
    try:
        stamp = shard_stamp(shard_path)
    except FileNotFoundError:
        stamp = None  # a missing output: Snakemake reruns the job for it
    job = str(status.get("job"))
    if stamp is not None and stamp != status.get("shard"):
        return "changed" + _digest((json.dumps(stamp) + job).encode())
    folder = Path(status_path).parent
    lost = sorted(name for name in status.get("store_segments", []) if not (folder / name).is_file())
    if lost:
        return "lost" + _digest("\n".join([*lost, job]).encode())
    rejected = _rejections(str(manifest_path), _mtime(manifest_path)).get(rank)
    if rejected:
        return "rejected" + rejected
    return status.get("retried")


def retried(status_path) -> str | None:
    """The failure the rank's last job was retried for (None: none, or no readable status)."""
    try:
        return read_status(status_path).get("retried")
    except (OSError, ValueError):
        return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def _mtime(path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


@functools.lru_cache(maxsize=4)
def _rejections(manifest_path: str, mtime_ns: int | None) -> dict[int, str]:
    """{rank: token} of the ranks whose shards the aggregation of ``manifest_path`` rejected, read
    once per version of the file: the Snakefile asks for every rank, and the manifest also lists
    every missing ID of a failed rank. An unreadable manifest rejects nothing (the aggregation,
    which rewrites it, runs after any rank that reruns)."""
    if mtime_ns is None:
        return {}
    try:
        manifest = json.loads(Path(manifest_path).read_text())
        return {int(entry["rank"]): str(entry["rejected"]) for entry in manifest["ranks_failed"] if "rejected" in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
