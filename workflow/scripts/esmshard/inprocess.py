"""Embedding in this process, without Snakemake: for a notebook, to try 100 proteins before
submitting 10 million, or to embed FASTA files on one machine's one GPU as ``esm-extract`` does.

``embed_files`` (``esmshard embed`` on the command line) runs the workflow's steps one after
another in this process, through the same code: the index (validating every record before any
model is loaded), a plan of one rank, the rank (its GPU leased, finished work saved in the store
as it goes) and the aggregation, into one HDF5 file laid out as ``embeddings.h5``. Its working
files (index, plan, store, log) go to a folder beside the output; the same call again resumes
from the store and computes only what is missing or changed. The index and the plan are made
again on every call (seconds for millions of proteins), so that no input change goes unseen.

``embed`` embeds sequences given in Python and returns the arrays:

    from esmshard import embed
    result = embed({"P62593": "MSIQHFRVALIPFFAAFCLPVFA", "Q1": "MKV"}, model="esm2_t33_650M_UR50D",
                   layers=[-1, 20], pooling=["mean", "per_residue"])
    result["ids"]                       # ['P62593', 'Q1']
    result["mean/layer_33"]             # [2, 1280] array, rows in the order of the IDs
    result["per_residue/layer_33"][0]   # [23, 1280] array: P62593's residues

A rank's steps, on one device: each sequence validated as the index validates a FASTA record
(``fasta.clean_residues``), the checkpoint loaded by ``model.load_model``, batches by
the engine's own ``batches``, and the engine and compute precision a rank would choose for these
settings (``engine.build_engine``); so the vectors are the ones the workflow writes to
``embeddings.h5`` for the same sequences and settings. Everything is held in memory.
"""

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from esmshard import EsmShardError, paths, settings
from esmshard.fasta import clean_residues, expand_fasta_paths
from esmshard.outputs import OutputSpec, pooling_of
from esmshard.shard import DTYPES
from esmshard.work import RankSettings, compute_precision

# Config options that embed() takes (the schema gives their defaults and checks their values).
OPTIONS = (
    "model",
    "model_type",
    "layers",
    "pooling",
    "long_sequences",
    "window_overlap",
    "precision",
    "dtype",
    "engine",
    "tokens_per_batch",
    "invalid_residues",
)


def embed(sequences, model=None, layers=None, pooling=None, device=None, **options) -> dict:
    """Embed ``sequences`` here, on one GPU or the CPU; returns a dict laid out like ``embeddings.h5``:

    - ``"ids"``: list of str. ``sequences`` is a dict ID -> sequence (string IDs), or a list of
      sequences, whose IDs are then "0", "1", ... (their positions, as strings);
    - ``"lengths"``: [n] int64 residues of each sequence (after validation);
    - ``"truncated"``: [n] bool, true where only the first 1022 residues were embedded;
    - one entry per output, e.g. ``"mean/layer_33"``, ``"bos/layer_33"``: an [n, dim] array, rows
      in the order of ``ids``; ``"per_residue/layer_33"``: a list of n arrays [embedded length, dim].

    ``model``, ``layers``, ``pooling`` and ``options`` are the workflow's config options of the
    same names (``model_type``, ``long_sequences``, ``window_overlap``, ``precision``, ``dtype`` (of
    the returned arrays), ``engine``, ``tokens_per_batch``, ``invalid_residues``); None or left
    out means the schema's default (config/README.md). ``device``: "cpu", "cuda", "cuda:1", a
    torch.device, or None for the current GPU if torch sees one, else the CPU.

    Raises ValueError for a bad sequence (naming its ID, record number and residue position),
    option or device, before the model is loaded, and for a ``model_type`` that is not the
    model's family; errors in loading the model (an unknown name,
    a damaged file, no network for a download) raise esmshard.EsmShardError.
    """
    import torch

    model = os.fspath(model) if isinstance(model, os.PathLike) else model
    given = {"model": model, "layers": layers, "pooling": pooling, **options}
    config, device = _checked_options({k: v for k, v in given.items() if v is not None}), _device(device)
    ids, residues = _validated(sequences, config["invalid_residues"])
    chosen = RankSettings.from_config(config)
    kind = torch.device(device).type
    precision = compute_precision(chosen, kind)
    from esmshard.architectures import MAX_RESIDUES, check_model, model_family
    from esmshard.engine import build_engine, check_precision
    from esmshard.model import load_model, resolve_checkpoint

    try:
        check_precision(chosen.engine, kind, precision)
    except EsmShardError as error:
        raise ValueError(str(error)) from None
    checkpoint = resolve_checkpoint(str(config["model"]))
    try:
        check_model(config["model_type"], chosen.pooling, checkpoint)
    except EsmShardError as error:
        raise ValueError(str(error)) from None

    network, alphabet = load_model(str(checkpoint.location))
    try:
        spec = OutputSpec.resolve(
            chosen.layers,
            chosen.pooling,
            network.num_layers,
            chosen.long_sequences,
            chosen.window_overlap,
            max_residues=MAX_RESIDUES[model_family(checkpoint)],
        )
    except ValueError as error:  # a layer the model does not have
        raise ValueError(f"config: {error}") from None
    lengths = np.array([len(r) for r in residues], np.int64)
    engine = build_engine(chosen.engine, network, alphabet, device, precision, spec, chosen.dtype)
    batches, _ = engine.batches(lengths, chosen.tokens_per_batch)
    outputs = _collect(engine, batches, residues, spec, DTYPES[chosen.dtype])
    return {"ids": ids, "lengths": lengths, "truncated": spec.truncated(lengths), **outputs}


# Workflow options that mean nothing for one rank in this process.
NOT_IN_PROCESS = ("fasta", "world_size", "require_complete", "timeout")


def embed_files(fasta_files, output, model=None, layers=None, pooling=None, work_dir=None, **options) -> dict:
    """Embed the proteins of ``fasta_files`` (paths or globs; plain, gzip, bzip2 or xz) in this
    process into ``output``, an HDF5 file laid out as the workflow's ``embeddings.h5`` (every ID,
    in input order); returns its manifest (``manifest.json``'s content: counts, what was computed
    and what came from the store).

    ``model``, ``layers``, ``pooling`` and ``options`` are the workflow's config options (the
    schema's defaults where left out or None), except the ones about ranks (world_size,
    require_complete, timeout); ``threads_per_rank`` sets torch's CPU threads. The computation
    runs on one GPU, leased as a rank leases one (the first visible one that no other esmshard
    process holds, waiting for one when all are; held until this process exits), or on the CPU
    where there is none. ``work_dir`` (default ``output`` + ".esmshard") holds the index, plan,
    store and manifest: keep it to resume, delete it once the output is all you need.

    Raises EsmShardError with one line naming the file and record for bad input, before any
    model is loaded and leaving nothing behind; ValueError for a bad option; EsmShardError for
    a model that cannot be used; any error of the computation after it, with the finished work
    kept in the store for the next call.
    """
    from esmshard.aggregate import aggregate
    from esmshard.index import build_index
    from esmshard.mainprocess import results_lock
    from esmshard.plan import make_plan
    from esmshard.rank import run_rank
    from esmshard.status import write_success
    from esmshard.work import RankSettings

    given = {"model": model, "layers": layers, "pooling": pooling, **options}
    given = {name: os.fspath(v) if isinstance(v, os.PathLike) else v for name, v in given.items() if v is not None}
    refused = sorted(set(given) & set(NOT_IN_PROCESS))
    if refused:
        raise ValueError(f"embed_files: {', '.join(refused)} is not an option of a run in this process")
    files = [os.fspath(f) for f in ([fasta_files] if isinstance(fasta_files, (str, os.PathLike)) else fasta_files)]
    config = settings.workflow_config({**given, "fasta": files})
    chosen = RankSettings.from_config(config, threads=config["threads_per_rank"])
    output = Path(output).resolve()
    work = Path(work_dir or default_work_dir(output)).resolve()
    new_work = not work.exists()
    inputs = expand_fasta_paths(files)
    results = work / Path(paths.EMBEDDINGS).parent
    with results_lock(results):
        try:
            build_index(inputs, work / Path(paths.INDEX).parent, config["invalid_residues"])
        except EsmShardError:
            if new_work:  # nothing finished is in it: leave no trace of a refused input
                shutil.rmtree(work, ignore_errors=True)
            raise
        numeric = {name: config[name] for name in ("layers", "pooling", "long_sequences", "window_overlap", "dtype")}
        make_plan(work / Path(paths.INDEX).parent, config["model"], config["model_type"], numeric, 1, work / paths.PLAN)
        shard, status = work / paths.SHARD.format(rank=0), work / paths.STATUS.format(rank=0)
        stats = run_rank(
            work / Path(paths.INDEX).parent, work / paths.PLAN, config["model"], 0, shard, results / "store", chosen
        )
        write_success(status, shard, 0, stats, attempt=1, host=socket.gethostname())
        return aggregate(
            work / Path(paths.INDEX).parent,
            work / paths.PLAN,
            [shard],
            [status],
            chosen,
            output,
            work / paths.MANIFEST,
            work / paths.MISSING_IDS,
            require_complete=True,
            compression=config["compression"],
        )


def default_work_dir(output) -> Path:
    """embed_files' working folder beside ``output``: OUT.h5 -> OUT.h5.esmshard."""
    output = Path(output)
    return output.with_name(output.name + paths.EMBED_WORK_SUFFIX)


def _checked_options(options: dict) -> dict:
    """The options with the schema's defaults for those not given, checked by the schema."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"embed: unknown option(s) {', '.join(map(repr, unknown))}; it takes {', '.join(OPTIONS)}")
    defaults = settings.defaults()
    return {**{name: defaults[name] for name in OPTIONS}, **settings.checked(options, partial=True)}


def _device(device) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a device ({error})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device} is neither the CPU nor a CUDA GPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device}, but torch {torch.__version__} finds no CUDA device")
    return str(device)


def _validated(sequences, invalid_residues: str) -> tuple[list[str], list[np.ndarray]]:
    """(IDs, residues as uint8 arrays), every sequence checked as a FASTA record is."""
    if isinstance(sequences, (str, bytes)):
        raise ValueError("sequences: give a dict of ID -> sequence or a list of sequences, not one string")
    if isinstance(sequences, Mapping):
        items = list(sequences.items())
    else:
        items = [(str(i), sequence) for i, sequence in enumerate(sequences)]
    residues = []
    for number, (seq_id, sequence) in enumerate(items, start=1):
        where = f"sequences: record {number} ({seq_id!r})"
        if not isinstance(seq_id, str) or not isinstance(sequence, str):
            raise ValueError(
                f"{where}: IDs and sequences must be strings, not {type(seq_id).__name__} and {type(sequence).__name__}"
            )
        try:
            cleaned, _ = clean_residues(sequence.encode(), where, invalid_residues)
        except EsmShardError as error:
            raise ValueError(str(error)) from None
        residues.append(np.frombuffer(cleaned, np.uint8))
    return [seq_id for seq_id, _ in items], residues


def _collect(engine, batches, residues, spec: OutputSpec, dtype) -> dict:
    """Every output of the engine's batches, by sequence: pooled [n, dim] arrays, per-residue
    lists of [embedded length, dim] arrays."""
    embedded = spec.embedded_lengths([len(r) for r in residues])
    outputs = {
        name: [None] * len(residues)
        if pooling_of(name) == "per_residue"
        else np.empty((len(residues), engine.dim), dtype)
        for name in spec.names
    }
    for batch, values in engine.embed_batches(batches, lambda batch: [residues[i] for i in batch]):
        for name, rows in values.items():
            if pooling_of(name) != "per_residue":
                outputs[name][batch] = rows.astype(dtype)
                continue
            for i, sequence_rows in zip(batch.tolist(), np.split(rows, np.cumsum(embedded[batch])[:-1])):
                outputs[name][i] = sequence_rows.astype(dtype)
    return outputs
