"""Engines turn batches of residue strings into the outputs of ``outputs.OutputSpec``.

A rank sees an engine through ``Engine`` only: ``check_precision`` before the model loads,
``open_engine`` (or ``build_engine`` for a loaded model) for the engine the settings name, then
the engine's ``batches``, ``embed_batches`` and ``stats``. Another model family plugs in as an engine with these.

- ``ReferenceEngine``: fair-esm's own ESM2.forward, on esmshard's batches re-padded to fair-esm's
  [pieces, longest] layout (the numbers of fair-esm's forward; not its extract.py batching).
- ``PackedEngine``: the packed forward of ``packed.py`` on unpadded token streams, with
  tokenising on a background thread, pinned host memory and asynchronous copies, pooling on the
  device, batches split in half on CUDA out-of-memory (a window that does not fit even alone
  computed on the CPU, in float32), and in float16 a batch whose outputs are not finite (an
  activation beyond float16's range) computed again in bfloat16.

Both build their batches with ``Packer.pack`` and pool with ``pool``: means over residue positions
without BOS and EOS (the vector ``scripts/extract.py --include mean`` writes), BOS vectors, and
per-residue vectors, windows of long proteins averaged where they overlap.
``embed_batches(batches, read)`` takes batches of positions (or ``batching.Batch``es) and a function
that returns their residues (uint8 arrays), and yields ``(batch, {dataset name: array})`` in order:
pooled outputs [len(batch), dim], per-residue outputs [sum of the batch's embedded lengths, dim], in
the stored dtype (``stored``: float32 or float16), cast on the device so that half as many bytes
cross to the host and no CPU time goes into converting them. A protein whose windows are spread
over several batches is summed in float32 on the host (``Assembler``; every output is a weighted
sum over pieces) and yielded, cast, with the batch of its last windows: a batch holding only some
of a protein's windows yields the positions of the sequences it finished, maybe none.
"""

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch

from esmshard import EsmShardError
from esmshard.batching import Batch, planned_batches
from esmshard.fasta import RESIDUES
from esmshard.outputs import OutputSpec, pooling_of, residue_offsets
from esmshard.packed import PackedESM, kernel_warmups, packed_model

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Padded tokens per batch of the reference engine: what fair-esm's extract.py uses.
REFERENCE_TOKENS_PER_BATCH = 4096


class Engine(Protocol):
    """What a rank asks of an engine."""

    device: torch.device
    spec: OutputSpec
    dim: int  # width of every output

    def batches(self, lengths: np.ndarray, tokens_per_batch: int | None) -> tuple[list[Batch], int]:
        """Batches of positions in ``lengths`` [n], and the token budget they were made for
        (``tokens_per_batch``, or the engine's own default for None)."""

    def embed_batches(self, batches, read) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """See the module docstring."""

    def stats(self) -> dict:
        """What the rank records of the engine's work: batches computed again in bfloat16, batches
        split on running out of GPU memory, windows computed on the CPU for lack of GPU memory,
        peak GPU memory (GiB; None on the CPU)."""


def check_precision(kind: str, device_type: str, precision: str) -> None:
    """Before the model loads: the one combination of engine, device and precision that no engine runs."""
    if device_type == "cpu" and kind == "reference" and precision != "float32":
        raise EsmShardError(
            f"precision: the reference engine computes in float32 only on the CPU, not "
            f"{precision}; set precision to float32 or auto, or engine to packed"
        )


def open_engine(checkpoint: dict, kind: str, device: str, precision: str, spec: OutputSpec, stored: str) -> Engine:
    """The model the plan recorded (``checkpoint``: its path as the option names it, its files'
    size and time) as the ``kind`` engine (see build_engine); raises EsmShardError when its
    files changed after the plan was made."""
    from esmshard.architectures import FAMILIES, checkpoint_stamp, resolve_model
    from esmshard.model import load_model

    check_precision(kind, torch.device(device).type, precision)
    resolved = resolve_model(checkpoint["path"])
    location = resolved.location
    if checkpoint_stamp(resolved) != {key: checkpoint[key] for key in ("size", "mtime_ns")}:
        raise EsmShardError(f"model: {location} changed after the plan was made; run snakemake again")
    started = time.monotonic()
    network, alphabet = load_model(str(location))
    engine = build_engine(kind, network, alphabet, device, precision, spec, stored)
    log.info(
        "model %s (%s, %d layers, dim %d) on %s, %s engine in %s, outputs %s; loaded in %.1f s",
        location,
        FAMILIES[checkpoint["family"]],
        network.num_layers,
        engine.dim,
        torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
        kind,
        precision,
        ", ".join(spec.names),
        time.monotonic() - started,
    )
    return engine


def build_engine(kind: str, network, alphabet, device: str, precision: str, spec: OutputSpec, stored: str) -> Engine:
    """The ``kind`` engine (``packed`` or ``reference``) of the loaded fair-esm ``network`` on
    ``device``, computing in ``precision`` and handing out ``stored`` outputs. Callers run
    check_precision before they load the model."""
    engine = PackedEngine if kind == "packed" else ReferenceEngine
    return engine(network, alphabet, device, precision, spec, stored)


def _peak_gpu_memory(device: torch.device) -> float | None:
    """GiB of GPU memory torch held at most in this process on ``device`` (None: the CPU)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 2)


@dataclass
class PackedBatch:
    """One unpadded token stream of P pieces (sequences or windows of them) for B sequences
    with R residue rows out; on the host (pinned when bound for a GPU) or on the device.

    R' residue tokens go in (overlapping windows repeat residues); each is added, weighted, to
    its row of the per-residue output and to its sequence's mean. A sequence may have only some
    of its windows here (``windows``); its outputs are then the part of its whole ones' sums
    that these windows make: its R rows are the residues ``spans`` its windows cover."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, 0 at every piece's first token (<cls>; ProtT5: its first residue)
    cu_seqlens: torch.Tensor  # [P+1] int32, where each piece starts
    token_piece: torch.Tensor  # [T] int64, the piece of each token
    residue_tokens: torch.Tensor  # [R'] int64, where the residue tokens are in the stream
    residue_rows: torch.Tensor  # [R'] int64, their per-residue output row (0..R-1)
    residue_seq: torch.Tensor  # [R'] int64, their sequence (0..B-1)
    residue_weight: torch.Tensor  # [R'] float32, 1 / windows covering the residue
    mean_weight: torch.Tensor  # [R'] float32, residue_weight / embedded length
    bos_tokens: torch.Tensor  # [P] int64, where each piece's <cls> is
    bos_seq: torch.Tensor  # [P] int64, its sequence
    bos_weight: torch.Tensor  # [P] float32, 1 / pieces of its sequence
    sequences: int  # B
    residue_rows_out: int  # R
    max_len: int  # longest piece, in tokens
    windows: np.ndarray  # [B, 2] int64, first and end window of each sequence here
    spans: np.ndarray  # [B, 2] int64, the residues (start, end) its rows here cover
    whole: bool  # every sequence has all its windows here

    def to(self, device) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedBatch(**moved)


class Packer:
    """Residue bytes to whole packed batches: ESM-2 token ids, vectorised, with every index the
    forward and the pooling need."""

    def __init__(self, alphabet, spec: OutputSpec):
        self.table = np.full(256, alphabet.unk_idx, np.int64)
        for code in RESIDUES:
            self.table[code] = alphabet.get_idx(chr(code))
        self.cls_idx, self.eos_idx, self.padding_idx = alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx
        self.bos = int(alphabet.prepend_bos)  # 0: residues then EOS (ProtT5)
        if not self.bos and "bos" in spec.poolings:
            raise ValueError("pooling: this model has no BOS token")
        self.spec = spec

    def pack(self, residues: list[np.ndarray], pin: bool = False, windows=None) -> PackedBatch:
        """``windows``: [B, 2] first and end window of each sequence to embed; None: all."""
        lengths = np.array([len(r) for r in residues], np.int64)  # [B]
        embedded = self.spec.embedded_lengths(lengths)  # [B]
        every = [self.spec.windows(int(n)) for n in lengths]  # [B] lists of (start, end)
        counts = np.array([len(w) for w in every], np.int64)  # [B]
        if windows is None:
            windows = np.stack([np.zeros_like(counts), counts], 1)
        windows = np.asarray(windows, np.int64).reshape(-1, 2)
        spans = np.array([(w[a][0], w[b - 1][1]) for w, (a, b) in zip(every, windows.tolist())], np.int64)
        pieces = [(seq, start, end) for seq, (a, b) in enumerate(windows.tolist()) for start, end in every[seq][a:b]]
        piece_seq, piece_start, piece_end = (np.array(column, np.int64) for column in zip(*pieces))  # [P]
        piece_len = piece_end - piece_start
        sizes = piece_len + 1 + self.bos
        cu_seqlens = np.concatenate([[0], np.cumsum(sizes)])  # [P+1]
        token_piece = np.repeat(np.arange(len(pieces)), sizes)  # [T]
        positions = np.arange(cu_seqlens[-1]) - cu_seqlens[:-1][token_piece]  # [T]
        first = positions - self.bos  # [T] position among the piece's residues
        residue_tokens = np.flatnonzero((first >= 0) & (first < piece_len[token_piece]))  # [R']
        tokens = np.empty(cu_seqlens[-1], np.int64)
        tokens[residue_tokens] = self.table[np.concatenate([residues[q][a:b] for q, a, b in pieces])]
        if self.bos:
            tokens[cu_seqlens[:-1]] = self.cls_idx
        tokens[cu_seqlens[1:] - 1] = self.eos_idx

        residue_piece = token_piece[residue_tokens]
        residue_seq = piece_seq[residue_piece]
        residue = piece_start[residue_piece] + first[residue_tokens]  # [R'] in its sequence
        # Windows over each residue, those in other batches too: with the sequences laid end to end,
        # a running count of the windows started less those ended.
        base = residue_offsets(embedded)  # [B+1]
        bounds = np.array([(s + b, e + b) for w, b in zip(every, base.tolist()) for s, e in w])  # [all windows, 2]
        coverage = np.cumsum(
            np.bincount(bounds[:, 0], minlength=base[-1]) - np.bincount(bounds[:, 1], minlength=base[-1] + 1)[:-1]
        )
        residue_weight = 1.0 / coverage[base[residue_seq] + residue]
        span_lengths = spans[:, 1] - spans[:, 0]
        residue_rows = residue_offsets(span_lengths)[:-1][residue_seq] + residue - spans[residue_seq, 0]
        arrays = {
            "tokens": tokens,
            "positions": positions,
            "cu_seqlens": cu_seqlens.astype(np.int32),
            "token_piece": token_piece,
            "residue_tokens": residue_tokens,
            "residue_rows": residue_rows,
            "residue_seq": residue_seq,
            "residue_weight": residue_weight.astype(np.float32),
            "mean_weight": (residue_weight / embedded[residue_seq]).astype(np.float32),
            "bos_tokens": cu_seqlens[:-1].astype(np.int64),
            "bos_seq": piece_seq,
            "bos_weight": (1.0 / counts[piece_seq]).astype(np.float32),
        }
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        if pin:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return PackedBatch(
            **tensors,
            sequences=len(residues),
            residue_rows_out=int(span_lengths.sum()),
            max_len=int(sizes.max()),
            windows=windows,
            spans=spans,
            whole=bool((windows[:, 1] - windows[:, 0] == counts).all()),
        )


def pool(hidden: torch.Tensor, batch: PackedBatch, names: list[str]) -> dict[str, torch.Tensor]:
    """The outputs ``names`` (of one layer) from its hidden states [T, D] float32, on the device."""
    residues = hidden[batch.residue_tokens]  # [R', D]
    out = {}
    for name in names:
        pooling = pooling_of(name)
        if pooling == "mean":
            target, rows, values = batch.sequences, batch.residue_seq, residues * batch.mean_weight[:, None]
        elif pooling == "per_residue":
            target, rows, values = batch.residue_rows_out, batch.residue_rows, residues * batch.residue_weight[:, None]
        else:  # bos
            target, rows, values = batch.sequences, batch.bos_seq, hidden[batch.bos_tokens] * batch.bos_weight[:, None]
        out[name] = hidden.new_zeros(target, hidden.shape[1]).index_add_(0, rows, values)
    return out


class Assembler:
    """Whole sequences from batches' outputs: a protein whose windows are spread over batches is
    summed here in float32, before the cast to the stored dtype, until its last window is in."""

    def __init__(self, spec: OutputSpec, stored: torch.dtype):
        self.spec, self.stored = spec, stored
        self.open = {}  # position -> (windows still to come, {name: float32 sums [1 or embedded length, D]})

    def host_dtype(self, packed: PackedBatch) -> torch.dtype:
        return self.stored if packed.whole else torch.float32

    def __call__(self, positions, residues, packed: PackedBatch, host: dict[str, torch.Tensor]):
        """(positions of the sequences finished, {name: their outputs as arrays in the stored dtype}),
        from one batch's outputs ``host`` (in ``host_dtype``)."""
        if packed.whole:
            return positions, {name: t.numpy() for name, t in host.items()}
        lengths = [len(r) for r in residues]
        counts, embedded = self.spec.window_counts(lengths), self.spec.embedded_lengths(lengths)
        rows = residue_offsets(packed.spans[:, 1] - packed.spans[:, 0])
        done, out = [], {name: [t[:0]] for name, t in host.items()}
        for i, (position, (first, end)) in enumerate(zip(np.asarray(positions).tolist(), packed.windows.tolist())):
            values = {
                name: t[rows[i] : rows[i + 1]] if _per_residue(name) else t[i : i + 1] for name, t in host.items()
            }
            if end - first < counts[i]:
                left, sums = self.open.pop(position, (counts[i], None))
                if sums is None:
                    sums = {
                        name: t.new_zeros(embedded[i] if _per_residue(name) else 1, t.shape[1])
                        for name, t in host.items()
                    }
                start, stop = packed.spans[i]
                for name, value in values.items():
                    (sums[name][start:stop] if _per_residue(name) else sums[name]).add_(value)
                if left > end - first:
                    self.open[position] = (left - (end - first), sums)
                    continue
                values = sums
            done.append(i)
            for name, value in values.items():
                out[name].append(value)
        finished = np.asarray(positions)[np.array(done, np.int64)]
        return finished, {name: torch.cat(parts).to(self.stored).numpy() for name, parts in out.items()}


def _per_residue(name: str) -> bool:
    return pooling_of(name) == "per_residue"


def _planned(batch):
    """(positions, windows) of a batch: a ``batching.Batch``, or positions of whole sequences."""
    return (batch.positions, batch.windows) if isinstance(batch, Batch) else (batch, None)


class ReferenceEngine:
    def __init__(self, network, alphabet, device: str, precision: str, spec: OutputSpec, stored: str = "float32"):
        self.device = torch.device(device)
        self.stored = PRECISIONS[stored]
        self.dtype = PRECISIONS[precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError("on the CPU the reference engine runs in float32 only")
        self.network = network.to(device=self.device, dtype=self.dtype).eval()
        self.spec = spec
        self.packer = Packer(alphabet, spec)
        self.dim = network.embed_tokens.embedding_dim

    def batches(self, lengths, tokens_per_batch):
        budget = tokens_per_batch or REFERENCE_TOKENS_PER_BATCH
        return planned_batches(lengths, self.spec, budget, padded=True), budget

    def stats(self) -> dict:
        return {
            "bfloat16_batches": 0,
            "out_of_memory_splits": 0,
            "cpu_batches": 0,
            "peak_gpu_memory_gib": _peak_gpu_memory(self.device),
        }

    def embed_batches(self, batches, read):
        assemble = Assembler(self.spec, self.stored)
        for batch in batches:
            positions, windows = _planned(batch)
            residues = read(positions)
            packed = self.packer.pack(residues, windows=windows)
            dtype = assemble.host_dtype(packed)
            yield assemble(positions, residues, packed, {n: t.to(dtype).cpu() for n, t in self.outputs(packed).items()})

    def embed(self, residues: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {name: t.to(self.stored).cpu().numpy() for name, t in self.outputs(self.packer.pack(residues)).items()}

    @torch.inference_mode()
    def outputs(self, packed: PackedBatch) -> dict[str, torch.Tensor]:
        batch = packed.to(self.device)
        pieces = len(batch.cu_seqlens) - 1
        padded = torch.full((pieces, batch.max_len), self.packer.padding_idx, device=self.device)  # [P, L]
        padded[batch.token_piece, batch.positions] = batch.tokens
        representations = self.network(padded, repr_layers=list(self.spec.layers))["representations"]
        out = {}
        for layer, hidden in representations.items():  # [P, L, D] -> [T, D], padding dropped
            out.update(pool(hidden[batch.token_piece, batch.positions].float(), batch, self.spec.layer_names(layer)))
        return out


class PackedEngine:
    def __init__(
        self,
        network,
        alphabet,
        device: str,
        precision: str,
        spec: OutputSpec,
        stored: str = "float32",
    ):
        self.device = torch.device(device)
        self.stored = PRECISIONS[stored]
        self.spec = spec
        self.model = _built_while_kernels_load(network, PRECISIONS[precision], self.device)
        self.packer = Packer(alphabet, spec)
        self.dim = network.embed_tokens.embedding_dim
        self._pin = self.device.type == "cuda"
        self.splits = 0  # batches split in two on running out of GPU memory
        # float16 carries 3 more mantissa bits than bfloat16 (ESM-2 650M: 20x smaller errors) but
        # overflows at 65504; a batch that does is computed again by a bfloat16 copy, built on first need.
        self._network = network  # for those copies and the CPU's below: the model as loaded, on the CPU
        self._overflow_guard = precision == "float16"
        self._fallback_model = None
        self.fallbacks = 0  # batches computed again in bfloat16
        # a window that does not fit in GPU memory even alone: computed by a float32 copy on the CPU
        self._cpu_model = None
        self.cpu_batches = 0

    def batches(self, lengths, tokens_per_batch):
        budget = tokens_per_batch or self.default_tokens_per_batch()
        return planned_batches(lengths, self.spec, budget, padded=self.model.padded), budget

    def stats(self) -> dict:
        return {
            "bfloat16_batches": self.fallbacks,
            "out_of_memory_splits": self.splits,
            "cpu_batches": self.cpu_batches,
            "peak_gpu_memory_gib": _peak_gpu_memory(self.device),
        }

    def default_tokens_per_batch(self) -> int:
        """Tokens per batch from free device memory: activations take ~64 bytes per token per width."""
        if self.device.type != "cuda":
            return 16384
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(np.clip(0.5 * free / (64 * self.dim), 4096, 131072))

    @torch.inference_mode()
    def outputs(self, batch: PackedBatch, model: PackedESM | None = None) -> dict[str, torch.Tensor]:
        """{dataset name: float32 tensor} on the device."""
        out = {}
        hidden_states = (model or self.model).hidden_states(
            batch.tokens, batch.positions, batch.cu_seqlens, batch.max_len, self.spec.layers
        )
        for layer, hidden in hidden_states:  # [T, D]
            out.update(pool(hidden, batch, self.spec.layer_names(layer)))
        return out

    def embed(self, residues: list[np.ndarray]) -> dict[str, np.ndarray]:
        return next(self.embed_batches([residues], lambda batch: batch))[1]

    def _outputs_splitting_on_oom(self, residues, packed: PackedBatch, model=None) -> dict[str, torch.Tensor]:
        """The batch's outputs, computed in halves (by sequences, or a lone protein's windows) while
        it does not fit; one window that does not fit even alone, on the CPU."""
        first, end = packed.windows[0]
        try:
            return self.outputs(packed.to(self.device), model)
        except torch.OutOfMemoryError:
            pass
        # Go on outside the except block: the exception's traceback holds the failed attempt's
        # activations, and nothing smaller would fit while it lives.
        torch.cuda.empty_cache()
        if len(residues) == 1 and end - first == 1:
            return self._outputs_on_cpu(packed)
        pieces = packed.windows[:, 1] - packed.windows[:, 0]
        sizes = np.cumsum(pieces * self.spec.piece_tokens([len(r) for r in residues]))
        log.warning("out of GPU memory on %d tokens; retrying as two batches", sizes[-1])
        self.splits += 1
        if len(residues) > 1:
            half = int(np.clip(np.searchsorted(sizes, sizes[-1] / 2), 1, len(residues) - 1))
            halves = [(residues[:half], packed.windows[:half]), (residues[half:], packed.windows[half:])]
        else:
            middle = (first + end) // 2
            halves = [(residues, [[first, middle]]), (residues, [[middle, end]])]
        packs = [self.packer.pack(r, self._pin, w) for r, w in halves]
        parts = [self._outputs_splitting_on_oom(r, p, model) for (r, _), p in zip(halves, packs)]
        if len({t.device for part in parts for t in part.values()}) > 1:  # a part computed on the CPU
            parts = [{name: t.cpu() for name, t in part.items()} for part in parts]
        if len(residues) > 1:
            return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        # one protein's two sets of windows: sums over pieces, its rows offset by where each starts
        out = {}
        for name in parts[0]:
            if not _per_residue(name):
                out[name] = parts[0][name] + parts[1][name]
                continue
            out[name] = parts[0][name].new_zeros(packed.residue_rows_out, parts[0][name].shape[1])
            for part, p in zip(parts, packs):
                start, stop = p.spans[0] - packed.spans[0, 0]
                out[name][start:stop] += part[name]
        return out

    def _outputs_on_cpu(self, packed: PackedBatch) -> dict[str, torch.Tensor]:
        """One window's outputs from a float32 copy of the model on the CPU (built on first need),
        left there (the device has no room for them)."""
        log.warning(
            "a window of %d tokens does not fit in GPU memory even alone; computing it on the CPU", packed.max_len
        )
        self.cpu_batches += 1
        if self._cpu_model is None:
            self._cpu_model = packed_model(self._network, torch.float32, "cpu").eval()
        return self.outputs(packed.to("cpu"), self._cpu_model)

    def embed_batches(self, batches, read):
        """Yields results in order; the host tokenises ahead, and batch i is copied back and
        handed out while the device already runs batch i+1."""
        prepared = _prefetch(
            (
                (positions, residues, self.packer.pack(residues, self._pin, windows))
                for positions, windows in map(_planned, batches)
                for residues in [read(positions)]
            ),
            depth=3,
        )
        assemble = Assembler(self.spec, self.stored)
        in_flight = None
        for positions, residues, packed in prepared:
            outputs = self._outputs_splitting_on_oom(residues, packed)
            launched = InFlight(positions, residues, packed, *self._to_host(outputs, assemble.host_dtype(packed)))
            if in_flight is not None:
                yield assemble(in_flight.positions, in_flight.residues, in_flight.packed, self._finish(in_flight))
            in_flight = launched
        if in_flight is not None:
            yield assemble(in_flight.positions, in_flight.residues, in_flight.packed, self._finish(in_flight))

    def _to_host(self, outputs: dict[str, torch.Tensor], dtype: torch.dtype):
        """Asynchronous copies of ``outputs``, in ``dtype`` (stored, or float32 for partial sums),
        to (pinned) host memory, with whether all were finite before that cast (checked only where
        a fallback exists), and an event that marks them done."""
        finite = None
        if self._overflow_guard:
            finite = torch.empty((), dtype=torch.bool, pin_memory=self._pin)
            finite.copy_(torch.stack([torch.isfinite(t).all() for t in outputs.values()]).all(), non_blocking=True)
        host = {}
        for name, result in outputs.items():
            host[name] = torch.empty(result.shape, dtype=dtype, pin_memory=self._pin)
            host[name].copy_(result.to(dtype), non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        return host, finite, event

    def _finish(self, in_flight: "InFlight") -> dict[str, torch.Tensor]:
        """The batch's outputs on the host, computed again in bfloat16 where float16 overflowed."""
        if in_flight.event is not None:
            in_flight.event.synchronize()
        host = in_flight.host
        if in_flight.finite is not None and not in_flight.finite.item():
            self.fallbacks += 1
            log.warning(
                "float16 overflowed on a batch of %d sequences; computing it again in bfloat16", len(in_flight.residues)
            )
            if self._fallback_model is None:
                self._fallback_model = packed_model(self._network, torch.bfloat16, self.device).eval()
            outputs = self._outputs_splitting_on_oom(in_flight.residues, in_flight.packed, self._fallback_model)
            host = {name: t.to(host[name].dtype).cpu() for name, t in outputs.items()}
        return host


def _built_while_kernels_load(network, dtype: torch.dtype, device: torch.device) -> PackedESM:
    """The packed model on ``device``; on a GPU, the kernels it runs are readied on threads
    meanwhile (packed.kernel_warmups)."""
    warmups = kernel_warmups(network, dtype, device) if device.type == "cuda" else []
    if not warmups:
        return packed_model(network, dtype, device).eval()
    with ThreadPoolExecutor(len(warmups)) as pool:
        loading = [pool.submit(warmup) for warmup in warmups]
        model = packed_model(network, dtype, device).eval()
        for warmup in loading:
            warmup.result()  # its errors here: the first batch would meet them too
    return model


@dataclass
class InFlight:
    """A batch whose results are on their way to the host."""

    positions: object
    residues: list
    packed: PackedBatch
    host: dict
    finite: torch.Tensor | None
    event: object


def _prefetch(items, depth: int):
    """Iterate ``items`` on a background thread, ``depth`` ahead; exceptions are re-raised here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in items:
                buffer.put(item)
        except BaseException as error:  # handed to the consumer
            buffer.put(error)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
