"""Engines turn batches of residue strings into one pooled vector per sequence.

- ``ReferenceEngine``: fair-esm's own ESM2.forward on padded batches, pooled like its extract.py.
- ``PackedEngine``: the packed forward of ``packed.py`` on unpadded token streams, with
  tokenising on a background thread, pinned host memory and asynchronous copies, pooling on the
  device, and batches split in half on CUDA out-of-memory.

Both pool the mean over residue positions of the chosen layer, without BOS, EOS and padding
(the vector ``scripts/extract.py --include mean`` writes), on at most 1022 residues.
``embed_batches(batches, read)`` takes batches of positions and a function that returns their
residues (uint8 arrays), and yields ``(batch, vectors [len(batch), dim] float32)`` in order.
"""

import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from esmshard.architectures import MAX_RESIDUES
from esmshard.fasta import ESM_RESIDUES
from esmshard.packed import PackedESM2

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_layer(layer: int, num_layers: int) -> int:
    """A layer number in 0..num_layers; negative numbers count from the end (-1: last)."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"layer {layer} is outside this model's layers 0..{num_layers} (or -1..-{num_layers + 1})")
    return resolved


class ReferenceEngine:
    def __init__(self, network, alphabet, device: str, precision: str, layer: int):
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError("on the CPU the reference engine runs in float32 only")
        self.network = network.to(device=self.device, dtype=self.dtype).eval()
        self.layer = resolve_layer(layer, network.num_layers)
        self.batch_converter = alphabet.get_batch_converter(truncation_seq_length=MAX_RESIDUES)
        self.dim = network.embed_dim

    def embed_batches(self, batches, read):
        for batch in batches:
            yield batch, self.embed([residues.tobytes().decode() for residues in read(batch)])

    @torch.inference_mode()
    def embed(self, sequences: list[str]) -> np.ndarray:
        """[len(sequences), dim] float32 mean embeddings."""
        _, _, tokens = self.batch_converter([(str(i), s) for i, s in enumerate(sequences)])
        tokens = tokens.to(self.device, non_blocking=True)
        out = self.network(tokens, repr_layers=[self.layer])["representations"][self.layer]  # [B, T, D]
        lengths = torch.tensor([min(len(s), MAX_RESIDUES) for s in sequences], device=self.device)
        positions = torch.arange(out.shape[1], device=self.device)
        residue_mask = (positions[None, :] >= 1) & (positions[None, :] <= lengths[:, None])  # [B, T]
        summed = (out.float() * residue_mask[:, :, None]).sum(dim=1)  # [B, D]
        return (summed / lengths[:, None]).cpu().numpy()


@dataclass
class PackedBatch:
    """One unpadded token stream on the host (pinned when bound for a GPU)."""

    tokens: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, 0 at every <cls>
    cu_seqlens: torch.Tensor  # [B+1] int32
    seq_index: torch.Tensor  # [T] int64, which sequence each token belongs to
    pool_weight: torch.Tensor  # [T] float32, 1/L on residues, 0 on <cls> and <eos>
    max_len: int

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(*(move(t) for t in (self.tokens, self.positions, self.cu_seqlens, self.seq_index,
                                               self.pool_weight)), self.max_len)


class Tokenizer:
    """Residue bytes to ESM-2 token ids, vectorised, producing packed streams."""

    def __init__(self, alphabet):
        self.table = np.full(256, alphabet.unk_idx, np.int64)
        for code in ESM_RESIDUES:
            self.table[code] = alphabet.get_idx(chr(code))
        self.cls_idx, self.eos_idx = alphabet.cls_idx, alphabet.eos_idx

    def pack(self, residues: list[np.ndarray], pin: bool = False) -> PackedBatch:
        lengths = np.array([min(len(r), MAX_RESIDUES) for r in residues], np.int64)  # [B]
        sizes = lengths + 2
        cu_seqlens = np.concatenate([[0], np.cumsum(sizes)])  # [B+1]
        seq_index = np.repeat(np.arange(len(residues)), sizes)  # [T]
        positions = np.arange(cu_seqlens[-1]) - cu_seqlens[:-1][seq_index]  # [T]
        is_residue = (positions >= 1) & (positions <= lengths[seq_index])
        tokens = np.empty(cu_seqlens[-1], np.int64)
        tokens[is_residue] = self.table[np.concatenate([r[:MAX_RESIDUES] for r in residues])]
        tokens[cu_seqlens[:-1]] = self.cls_idx
        tokens[cu_seqlens[1:] - 1] = self.eos_idx
        pool_weight = np.where(is_residue, 1.0 / lengths[seq_index], 0.0).astype(np.float32)
        tensors = [torch.from_numpy(a) for a in (tokens, positions, cu_seqlens.astype(np.int32), seq_index, pool_weight)]
        if pin:
            tensors = [t.pin_memory() for t in tensors]
        return PackedBatch(*tensors, int(sizes.max()))


class PackedEngine:
    def __init__(self, network, alphabet, device: str, precision: str, layer: int, compile: bool = False):
        self.device = torch.device(device)
        self.layer = resolve_layer(layer, network.num_layers)
        self.model = PackedESM2(network, PRECISIONS[precision], self.device, compile).eval()
        self.tokenizer = Tokenizer(alphabet)
        self.dim = network.embed_dim
        self._pin = self.device.type == "cuda"

    def default_tokens_per_batch(self) -> int:
        """Tokens per batch from free device memory: activations take ~64 bytes per token per width."""
        if self.device.type != "cuda":
            return 16384
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(np.clip(0.5 * free / (64 * self.dim), 4096, 131072))

    @torch.inference_mode()
    def pooled(self, batch: PackedBatch) -> torch.Tensor:
        """[B, D] float32 means, on the device."""
        hidden = self.model(batch.tokens, batch.positions, batch.cu_seqlens, batch.max_len, self.layer)  # [T, D]
        pooled = torch.zeros(len(batch.cu_seqlens) - 1, self.dim, device=hidden.device)
        return pooled.index_add_(0, batch.seq_index, hidden * batch.pool_weight[:, None])

    def embed(self, residues: list[np.ndarray]) -> np.ndarray:
        return self._pooled_splitting_on_oom(residues, self.tokenizer.pack(residues, self._pin)).cpu().numpy()

    def _pooled_splitting_on_oom(self, residues, packed: PackedBatch) -> torch.Tensor:
        try:
            return self.pooled(packed.to(self.device))
        except torch.OutOfMemoryError:
            if len(residues) == 1:
                raise
            torch.cuda.empty_cache()
            sizes = np.cumsum([min(len(r), MAX_RESIDUES) + 2 for r in residues])
            half = int(np.clip(np.searchsorted(sizes, sizes[-1] / 2), 1, len(residues) - 1))
            log.warning("out of GPU memory on %d tokens; retrying as two batches", sizes[-1])
            parts = (residues[:half], residues[half:])
            return torch.cat([self._pooled_splitting_on_oom(p, self.tokenizer.pack(p, self._pin)) for p in parts])

    def embed_batches(self, batches, read):
        """Yields results in order; the host tokenises ahead, and batch i is copied back and
        handed out while the device already runs batch i+1."""
        prepared = _prefetch(((batch, residues, self.tokenizer.pack(residues, self._pin))
                              for batch in batches for residues in [read(batch)]), depth=3)
        in_flight = None  # (batch, host result, event)
        for batch, residues, packed in prepared:
            pooled = self._pooled_splitting_on_oom(residues, packed)
            host = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=self._pin)
            host.copy_(pooled, non_blocking=True)
            event = torch.cuda.Event() if self.device.type == "cuda" else None
            if event is not None:
                event.record()
            if in_flight is not None:
                yield _finish(in_flight)
            in_flight = (batch, host, event)
        if in_flight is not None:
            yield _finish(in_flight)


def _finish(in_flight):
    batch, host, event = in_flight
    if event is not None:
        event.synchronize()
    return batch, host.numpy()


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
