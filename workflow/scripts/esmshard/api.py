"""Running the workflow from Python, with the entry points of the code esmshard replaces:

    merged, failed_ranks = run_multi_gpu_inference(fasta_files, output_dir, {"model": ...})
    merged = run_esm2_multi_gpu(fasta_files, output_dir)  # raises unless every rank succeeded

Each call runs the real ``snakemake`` command on this repository's workflow/Snakefile with
``--directory output_dir`` and a config file written there: first for the index alone, so that
bad input stops the call before any model is loaded, then for everything else. Calling again
with the same arguments resumes, as rerunning snakemake does: only what failed or is missing
is redone. Everything snakemake prints is appended to ``output_dir/logs/snakemake.log``. One
run at a time may use an output directory: a call holds the lock that every run of the workflow
takes (``results/.lock``, ``esmshard.mainprocess``) before it writes anything there.
"""

import contextlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import yaml

from esmshard import EsmShardError, paths, settings
from esmshard.gpu import count_visible_gpus
from esmshard.index import SequenceIndex
from esmshard.mainprocess import failed_jobs, results_lock
from esmshard.outputs import OutputSpec, pooling_of
from esmshard.plan import read_plan
from esmshard.progress import Watcher
from esmshard.status import read_status

SNAKEFILE = paths.WORKFLOW_DIR / "Snakefile"

DEFAULT_MODEL = settings.defaults()["model"]
# Config options that run_multi_gpu_inference takes as arguments, not in model_config.
ARGUMENT_OPTIONS = {"fasta": "fasta_files", "world_size": "world_size", "timeout": "timeout"}
# model_config keys of the original contract, and the workflow's names for them.
ORIGINAL_CONTRACT_NAMES = {"model_name": "model", "token_budget": "tokens_per_batch"}

CONFIG_FILE = "config.yaml"
PROGRESS_DIR = "results/progress"
LOG_FILE = "logs/snakemake.log"
CALL_LINE = "===== run_multi_gpu_inference at {:%Y-%m-%d %H:%M:%S} =====\n"  # starts each call's log
INDEX_TARGETS = (paths.INDEX, paths.RESIDUES)  # before any model is fetched
_CHECK_ROWS = 16384  # rows of the merged file checked at a time
_ESMSHARD_ERROR = re.compile(r"^esmshard: ERROR: (.+)$", re.MULTILINE)
# An error raised while snakemake reads the workflow (e.g. an unknown model name); not the
# CalledProcessError that only says a rule's script failed (its own message is logged above it).
_WORKFLOW_ERROR = re.compile(r'^(?!CalledProcessError)\w+Error in file "[^"]+", line \d+:\n(.+)$', re.MULTILINE)


def run_multi_gpu_inference(
    fasta_files, output_dir, model_config, world_size=None, timeout=None, *, echo=False, progress=None
):
    """Embed ``fasta_files`` with the workflow in ``output_dir``; returns (path of the merged
    ``results/embeddings.h5``, sorted list of the ranks that failed).

    - ``fasta_files``: a path or glob, or a list of them (plain, gzip, bzip2 or xz).
    - ``model_config``: workflow config options (config/config.yaml, checked against
      workflow/schemas/config.schema.yaml); ``model`` is required. The original contract's
      ``{"model_type": "esm2", "model_name": ..., "token_budget": ...}`` works too.
    - ``world_size``: number of ranks; None means one per GPU visible here
      (CUDA_VISIBLE_DEVICES is honoured), or 1 without GPUs.
    - ``timeout``: time limit of each rank (seconds, or a string such as "90m"); a rank over it
      stops, keeps its finished work for the next call and counts as failed.
    - ``echo``: also print snakemake's output (to stderr) as it runs.
    - ``progress``: a function called, from another thread, with an ``esmshard.progress.Overall``
      (sequences and residues done of the total, residues/s, ETA; ``.line()`` says it in words)
      when a rank starts or ends and at most every ``progress_seconds`` meanwhile.

    The embeddings of failed ranks are missing from the merged file; their IDs are in
    ``results/missing_ids.txt`` and ``results/manifest.json``, and calling again retries those
    ranks only. Raises ValueError for bad arguments, bad input (with the index's message) or a
    merged file that fails its check, and RuntimeError when no rank succeeded, the workflow
    failed otherwise, or another call is using ``output_dir`` (before changing anything in it).
    """
    if not SNAKEFILE.is_file():
        raise RuntimeError(
            f"esmshard's workflow is not at {SNAKEFILE}: install esmshard from its repository "
            f"('pip install .', or 'pip install -e .' for a checkout), which carries the workflow"
        )
    if importlib.util.find_spec("snakemake") is None:
        raise RuntimeError(
            f"running the workflow needs Snakemake, which {sys.executable} lacks: pip install 'esmshard[workflow]' "
            f"(esmshard.embed() embeds in this process without it)"
        )
    output_dir = Path(output_dir).resolve()
    gpus = count_visible_gpus()
    world_size = max(1, gpus) if world_size is None else world_size
    config = _workflow_config(fasta_files, model_config, world_size, timeout)
    with _sole_call(output_dir) as env:
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        # Locally --resources gpu caps how many ranks run at once; without GPUs the ranks run on
        # the CPU, and only --cores limits them.
        interval = config.get("progress_seconds", settings.defaults()["progress_seconds"])
        _run_workflow(output_dir, gpus or world_size, world_size, echo, env, progress, interval)
        manifest = json.loads((output_dir / paths.MANIFEST).read_text())
        merged = output_dir / paths.EMBEDDINGS
        _check_merged(merged, output_dir, manifest)
    return merged, sorted(failed["rank"] for failed in manifest["ranks_failed"])


def run_esm2_multi_gpu(fasta_files, output_dir, world_size=None):
    """Embed ``fasta_files`` with ESM-2 650M and every default; returns the merged file's path.

    As run_multi_gpu_inference, but any failed rank raises RuntimeError (naming the ranks and
    the file of missing IDs; the other ranks' embeddings are in the merged file, and calling
    again retries only the failed ranks).
    """
    merged, failed = run_multi_gpu_inference(fasta_files, output_dir, {"model": DEFAULT_MODEL}, world_size)
    if failed:
        manifest = json.loads((Path(output_dir) / paths.MANIFEST).read_text())
        raise RuntimeError(
            f"rank(s) {', '.join(map(str, failed))} failed: {manifest['missing']} of {manifest['sequences']} "
            f"sequences have no embedding (IDs in {Path(output_dir).resolve() / paths.MISSING_IDS}; errors in "
            f"{Path(output_dir).resolve() / paths.MANIFEST}); the others are in {merged}. Call again to retry "
            f"only the failed ranks"
        )
    return merged


@contextlib.contextmanager
def _sole_call(output_dir: Path):
    """Hold output_dir's results folder for this call (the lock every run of the workflow takes),
    or raise RuntimeError before anything is written: another call, or a snakemake command, is
    using it. Yields the environment for this call's snakemake commands."""
    try:
        with results_lock(output_dir / Path(paths.MANIFEST).parent) as env:
            yield env
    except EsmShardError as error:
        raise RuntimeError(str(error)) from None


def _run_workflow(output_dir: Path, gpu_slots: int, world_size: int, echo: bool, env: dict, progress, interval):
    """snakemake for the index, then for everything else (``progress`` called meanwhile), raising
    as run_multi_gpu_inference says. Their output is appended to the log after a line naming
    this call's time."""
    log_path = output_dir / LOG_FILE
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "a") as log:  # an earlier call's log is kept
        log.write(CALL_LINE.format(datetime.now()))
        returncode, output = _snakemake(output_dir, gpu_slots, INDEX_TARGETS, log, echo, env)
        if returncode:
            reasons = _error_messages(output)
            if reasons:
                raise ValueError(f"{'; '.join(reasons)} (snakemake output: {log_path})")
            jobs = failed_jobs(output, output_dir)
            raise RuntimeError(
                f"building the index failed: {'; '.join(jobs) or _tail(output)} (snakemake output: {log_path})"
            )
        watcher = progress and Watcher(output_dir / PROGRESS_DIR, interval, progress).start()
        try:
            returncode, output = _snakemake(output_dir, gpu_slots, (), log, echo, env)
        finally:
            if watcher:
                watcher.stop()
    if returncode:
        raise RuntimeError(_failure(output_dir, world_size, output, log_path))


def _workflow_config(fasta_files, model_config, world_size, timeout) -> dict:
    """The workflow's config for these arguments, checked against the workflow's own schema.

    Paths become absolute, since snakemake runs in the output directory.
    """
    if isinstance(model_config, Mapping):
        model_config = _from_original_contract(model_config)
    if not isinstance(model_config, Mapping) or "model" not in model_config:
        raise ValueError(
            "model_config must be a dict with at least 'model' (a released ESM-2 name or a checkpoint path)"
        )
    schema = settings.schema()
    options = set(schema["properties"]) - set(ARGUMENT_OPTIONS)
    unknown = sorted(set(model_config) - set(schema["properties"]))
    if unknown:
        raise ValueError(
            f"model_config: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"the workflow's options are {', '.join(sorted(options))}"
        )
    given_as_arguments = sorted(set(model_config) & set(ARGUMENT_OPTIONS))
    if given_as_arguments:
        raise ValueError(
            f"model_config: {', '.join(map(repr, given_as_arguments))} are set through the argument(s) "
            f"{', '.join(ARGUMENT_OPTIONS[key] for key in given_as_arguments)}, not in model_config"
        )
    if isinstance(fasta_files, (str, os.PathLike)):
        fasta_files = [fasta_files]
    model = Path(model_config["model"]).expanduser()
    config = {
        "fasta": [os.path.abspath(os.path.expanduser(pattern)) for pattern in fasta_files],
        **model_config,
        "model": str(model.resolve()) if model.exists() else str(model_config["model"]),  # a file or a directory
        "world_size": world_size,
        "timeout": timeout,
    }
    return settings.checked(config)


def _from_original_contract(model_config: Mapping) -> dict:
    """model_config with the keys of the original contract, which users port code from, as the
    workflow's: model_name is model, token_budget tokens_per_batch (model_type is the workflow's too)."""
    config = dict(model_config)
    for old, new in ORIGINAL_CONTRACT_NAMES.items():
        if old in config and new in config:
            raise ValueError(f"model_config: give {new!r} or {old!r} (its original name), not both")
        if old in config:
            config[new] = config.pop(old)
    return config


def _snakemake(output_dir: Path, gpu_slots: int, targets, log, echo: bool, env: dict) -> tuple[int, str]:
    """Run snakemake for ``targets`` (none: the whole workflow); its output goes to ``log``
    (and stderr when ``echo``). Returns (exit code, output)."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(output_dir),
        "--configfile",
        str(output_dir / CONFIG_FILE),
        "--cores",
        "all",
        "--resources",
        f"gpu={gpu_slots}",
        "--keep-going",  # the other ranks finish even when one's job dies
        "--retries",
        "1",  # as profiles/local: a failed rank is tried once more before its failure is recorded
        "--rerun-incomplete",  # after an interrupted call, redo what it left half-done
        *targets,
    ]
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    lines = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stderr.write(line)
            lines.append(line)
    log.flush()
    return process.returncode, "".join(lines)


def _error_messages(output: str) -> list[str]:
    """esmshard's own error lines and errors in reading the workflow, in order, once each."""
    messages = _ESMSHARD_ERROR.findall(output) + _WORKFLOW_ERROR.findall(output)
    return list(dict.fromkeys(message.strip() for message in messages))


def _tail(output: str, lines: int = 15) -> str:
    return " | ".join(line for line in output.strip().splitlines()[-lines:])


def _failure(output_dir: Path, world_size: int, output: str, log_path: Path) -> str:
    """Why the workflow failed after the index: each rank's recorded error, each job that failed
    for good with its log's first error line, and where to read more."""
    ranks = []
    for rank in range(world_size):
        try:
            status = read_status(output_dir / paths.STATUS.format(rank=rank))
        except (OSError, ValueError):  # snakemake removes the status of a job that died
            continue
        if not status["ok"]:
            ranks.append(f"rank {rank}: {status['error']}")
    where = f"rank logs in {(output_dir / paths.RANK_LOG).parent}, snakemake output in {log_path}"
    if len(ranks) == world_size:
        return f"no rank succeeded, so there are no embeddings: {'; '.join(ranks)} ({where})"
    details = ranks + failed_jobs(output, output_dir)
    details += [m for m in _error_messages(output) if not any(m in detail for detail in details)]
    return f"the esmshard workflow failed: {'; '.join(details or [_tail(output)])} ({where})"


def _check_merged(merged: Path, output_dir: Path, manifest: dict) -> None:
    """The merged file holds exactly the index's IDs less the missing ones, in input order,
    with finite vectors of the model's width; raises ValueError otherwise."""
    missing = {seq_id for failed in manifest["ranks_failed"] for seq_id in failed["missing_ids"]}
    index_ids = SequenceIndex((output_dir / paths.INDEX).parent).ids()
    expected = [seq_id for seq_id in index_ids if seq_id not in missing]
    width = read_plan(output_dir / paths.PLAN).model["embed_dim"]
    with h5py.File(merged, "r") as h5:
        ids = h5["ids"].asstr()[:].tolist()
        if ids != expected:
            differ = (i for i, (got, want) in enumerate(zip(ids, expected)) if got != want)
            row = next(differ, min(len(ids), len(expected)))
            raise ValueError(
                f"{merged} fails its check: its IDs are not the index's {len(expected)} IDs less the "
                f"{len(missing)} missing ones, in input order ({len(ids)} IDs, the first difference at row {row})"
            )
        spec = OutputSpec.from_attrs(h5.attrs)
        rows = {"pooled": len(expected)}
        if spec.per_residue:
            offsets = h5["residue_offsets"][:]
            embedded = spec.embedded_lengths(h5["lengths"][:])
            if not np.array_equal(np.diff(offsets), embedded) or offsets[0] != 0:
                raise ValueError(f"{merged} fails its check: residue_offsets do not match the sequence lengths")
            rows["per_residue"] = int(offsets[-1])
        for name in spec.names:
            dataset = h5[name]
            shape = (rows.get(pooling_of(name), rows["pooled"]), width)
            if dataset.shape != shape:
                raise ValueError(f"{merged} fails its check: {name} has shape {dataset.shape}, expected {shape}")
            for start in range(0, shape[0], _CHECK_ROWS):
                finite = np.isfinite(dataset[start : start + _CHECK_ROWS]).all(axis=1)
                if not finite.all():
                    row = start + int(np.argmin(finite))
                    owner = (
                        row if pooling_of(name) != "per_residue" else int(np.searchsorted(offsets, row, "right")) - 1
                    )
                    raise ValueError(f"{merged} fails its check: {name} of {ids[owner]!r} (row {row}) is not finite")
