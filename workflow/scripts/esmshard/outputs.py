"""What a run stores for each sequence: which layers, which poolings, and how long proteins are cut.

Datasets, the same in store segments, shards and ``embeddings.h5`` (docs/output-format.md):
- ``mean/layer_<L>``, ``bos/layer_<L>``: [n, dim], one vector per sequence;
- ``per_residue/layer_<L>``: [total residues, dim], ragged: sequence i owns rows
  ``residue_offsets[i]:residue_offsets[i + 1]`` (``residue_offsets``: [n + 1] int64).

Proteins over the model family's ``max_residues`` (``architectures.MAX_RESIDUES``: 1022 for
ESM-2 and ESM-1b) are either truncated (their first ``max_residues`` residues are embedded and
the sequence is flagged) or cut into overlapping windows of ``max_residues``: each residue's
vector is the average over the windows that cover it, the mean is over the whole protein, and
BOS is the average of the windows' BOS vectors.
"""

from dataclasses import dataclass

import numpy as np

from esmshard import settings

POOLINGS = ("mean", "bos", "per_residue")
# The limit of files written before they recorded one (max_residues): every family was cut there.
UNRECORDED_MAX_RESIDUES = 1022
LONG_SEQUENCES = ("truncate", "window")


def resolve_layer(layer: int, num_layers: int) -> int:
    """A layer number in 0..num_layers; negative numbers count from the end (-1: last)."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"layer {layer} is outside this model's layers 0..{num_layers} (or -1..-{num_layers + 1})")
    return resolved


@dataclass(frozen=True)
class OutputSpec:
    layers: tuple[int, ...]  # absolute layer numbers, increasing, no repeats
    poolings: tuple[str, ...]  # in POOLINGS order, no repeats
    num_layers: int  # of the model
    long_sequences: str
    window_overlap: int  # residues shared by neighbouring windows (window mode)
    max_residues: int  # of a piece: the model family's limit (architectures.MAX_RESIDUES)

    @classmethod
    def resolve(cls, layers, poolings, num_layers: int, long_sequences=None, window_overlap=None, *, max_residues: int):
        """The spec of these options (as in the config; those not given take the schema's defaults)
        for a model of ``num_layers`` that takes ``max_residues`` at once."""
        defaults = settings.defaults()
        long_sequences = defaults["long_sequences"] if long_sequences is None else long_sequences
        window_overlap = defaults["window_overlap"] if window_overlap is None else window_overlap
        unknown = set(poolings) - set(POOLINGS)
        if unknown or not poolings:
            raise ValueError(f"pooling must be some of {', '.join(POOLINGS)}, not {sorted(unknown) or 'nothing'}")
        if long_sequences not in LONG_SEQUENCES:
            raise ValueError(f"long_sequences must be one of {', '.join(LONG_SEQUENCES)}, not {long_sequences!r}")
        if not 0 <= window_overlap < max_residues:
            raise ValueError(f"window_overlap must be in 0..{max_residues - 1}, not {window_overlap}")
        if not layers:
            raise ValueError("layers must name at least one layer")
        absolute = sorted({resolve_layer(int(layer), num_layers) for layer in layers})
        ordered = tuple(p for p in POOLINGS if p in poolings)
        return cls(tuple(absolute), ordered, num_layers, long_sequences, int(window_overlap), int(max_residues))

    @property
    def names(self) -> list[str]:
        """Every output dataset, e.g. 'mean/layer_33'."""
        return [dataset_name(p, layer) for p in self.poolings for layer in self.layers]

    def layer_names(self, layer: int) -> list[str]:
        """The outputs taken from one layer."""
        return [dataset_name(p, layer) for p in self.poolings]

    @property
    def per_residue(self) -> bool:
        return "per_residue" in self.poolings

    def attrs(self) -> dict:
        """As stored in files (and part of a segment's identity)."""
        return {
            "num_layers": self.num_layers,
            "layers": list(self.layers),
            "pooling": list(self.poolings),
            "long_sequences": self.long_sequences,
            "window_overlap": self.window_overlap if self.long_sequences == "window" else 0,
            "max_residues": self.max_residues,
        }

    @classmethod
    def from_attrs(cls, attrs) -> "OutputSpec":
        """From a file's attributes (h5py's or plain values)."""
        return cls(
            tuple(int(x) for x in attrs["layers"]),
            tuple(str(p) for p in attrs["pooling"]),
            int(attrs["num_layers"]),
            str(attrs["long_sequences"]),
            int(attrs["window_overlap"]),
            int(attrs.get("max_residues", UNRECORDED_MAX_RESIDUES)),
        )

    def truncated(self, lengths) -> np.ndarray:
        """[n] bool: sequences of which only the first max_residues residues are embedded."""
        return (np.asarray(lengths) > self.max_residues) & (self.long_sequences == "truncate")

    def embedded_lengths(self, lengths) -> np.ndarray:
        """[n] residues that get a vector (the per-residue rows of each sequence)."""
        lengths = np.asarray(lengths, np.int64)
        return np.where(self.truncated(lengths), self.max_residues, lengths)

    def window_counts(self, lengths) -> np.ndarray:
        """[n] pieces each sequence is embedded as: windows of max_residues, or 1 unless windowed."""
        lengths = np.asarray(lengths, np.int64)
        windowed = (lengths > self.max_residues) & (self.long_sequences == "window")
        step = self.max_residues - self.window_overlap
        return np.where(windowed, 1 + -(-(lengths - self.max_residues) // step), 1)

    def windows(self, length: int) -> list[tuple[int, int]]:
        """(start, end) of the pieces embedded for a sequence of ``length`` residues: the
        sequence itself, its first max_residues, or windows of max_residues spread evenly so that
        neighbours share at least ``window_overlap`` residues."""
        count = int(self.window_counts([length])[0])
        if count == 1:
            return [(0, min(length, self.max_residues))]
        starts = np.rint(np.linspace(0, length - self.max_residues, count)).astype(int)
        return [(int(s), int(s) + self.max_residues) for s in starts]

    def tokens(self, lengths) -> np.ndarray:
        """[n] tokens each sequence puts through the model: every piece with BOS and EOS (the
        windows of a windowed sequence are all max_residues long)."""
        return self.window_counts(lengths) * self.piece_tokens(lengths)

    def piece_tokens(self, lengths) -> np.ndarray:
        """[n] tokens of each piece a sequence is embedded as: its residues, at most max_residues
        (a windowed sequence's windows are all full), with BOS and EOS."""
        return np.minimum(np.asarray(lengths, np.int64), self.max_residues) + 2


def dataset_name(pooling: str, layer: int) -> str:
    return f"{pooling}/layer_{layer}"


def pooling_of(name: str) -> str:
    return name.split("/", 1)[0]


def residue_offsets(embedded_lengths) -> np.ndarray:
    """[n + 1] int64: where each sequence's per-residue rows start and end."""
    return np.concatenate([[0], np.cumsum(embedded_lengths, dtype=np.int64)])


def ranges_index(starts, lengths) -> np.ndarray:
    """The concatenation of arange(start, start + length) for each pair, vectorised."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


def sorted_rows(positions, embedded) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of sequences at ``positions`` (any order; ``embedded``: their per-residue row
    counts) put in position order: (the order of their pooled rows, of their per-residue rows)."""
    order = np.argsort(positions, kind="stable")
    starts = residue_offsets(embedded)[:-1]
    return order, ranges_index(starts[order], np.asarray(embedded)[order])


def blocks(sizes, max_count: int, max_size: int) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive items of at most ``max_count`` items and ``max_size`` of
    ``sizes`` in all (or one item alone, where it is larger)."""
    ends = np.cumsum(sizes)
    found, start = [], 0
    while start < len(ends):
        before = ends[start - 1] if start else 0
        end = min(len(ends), start + max_count, int(np.searchsorted(ends, before + max_size, side="right")))
        found.append((start, max(end, start + 1)))
        start = found[-1][1]
    return found


def runs(sorted_positions) -> list[tuple[int, int]]:
    """(first, last + 1) index pairs of the runs of consecutive values in a sorted array."""
    breaks = np.flatnonzero(np.diff(sorted_positions) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_positions)]])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
