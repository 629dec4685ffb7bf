"""Token-budget batches over length-sorted sequences.

Sizes are in tokens and already include each piece's BOS and EOS. A long protein cut into
windows (``outputs.py``) counts all its windows; where they exceed the budget, its windows are
spread over several batches (``planned_batches``).
"""

from dataclasses import dataclass

import numpy as np

from esmshard.outputs import OutputSpec


@dataclass(frozen=True)
class Batch:
    """A planned batch: sequences ``positions``, each with the range of its windows embedded here."""

    positions: np.ndarray  # [k]
    windows: np.ndarray | None  # [k, 2] first and end window of each; None: all windows of every one
    tokens: int  # its size as the budget counts it


def planned_batches(lengths, spec: OutputSpec, tokens_per_batch: int, padded: bool = False) -> list[Batch]:
    """Batches of the sequences of ``lengths`` within ``tokens_per_batch`` (``padded``: rows × widest,
    else real tokens). A windowed protein over the budget goes in runs of as many windows as the
    budget holds (one where a window is over it), each an item for the batchers below; a full run
    leaves room for less than a window, so a protein's runs never share a batch."""
    width = spec.piece_tokens(lengths)  # [n]
    counts = spec.window_counts(lengths)  # [n]
    per_run = np.maximum(tokens_per_batch // (padded_cost(width) if padded else width), 1)
    runs = -(-counts // per_run)  # [n]
    seq = np.repeat(np.arange(len(counts)), runs)  # [items]
    first = (np.arange(len(seq)) - np.repeat(np.cumsum(runs) - runs, runs)) * per_run[seq]
    end = np.minimum(first + per_run[seq], counts[seq])
    rows, width = end - first, width[seq]
    if padded:
        groups = padded_batches(width, tokens_per_batch, rows)
        sizes = [int(rows[g].sum() * padded_cost(width[g].max())) for g in groups]
    else:
        groups = packed_batches(rows * width, tokens_per_batch)
        sizes = [int((rows[g] * width[g]).sum()) for g in groups]
    split = runs[seq] > 1
    return [
        Batch(seq[g], np.stack([first[g], end[g]], 1) if split[g].any() else None, size)
        for g, size in zip(groups, sizes)
    ]


# Past this width a padded batch's attention ([rows, heads, L, L]) outgrows its activations
# ([rows, L, width]); a row of a wider batch counts width x width / ATTENTION_WIDTH tokens, so
# that a batch of long pieces takes no more attention memory than one of ATTENTION_WIDTH-token pieces.
ATTENTION_WIDTH = 1024


def padded_cost(width):
    """What one row of a padded batch ``width`` tokens wide counts against the budget."""
    width = np.asarray(width, np.int64)
    return np.maximum(width, width * width // ATTENTION_WIDTH)


def padded_batches(widths, tokens_per_batch: int, rows=None) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches whose padded size (rows × widest, the widest counted
    as ``padded_cost``) fits the budget.

    ``widths``: tokens of each sequence's (longest) piece; ``rows``: pieces per sequence (1 when
    None). Sequences are taken widest first, so a batch holds similar lengths and little
    padding; a sequence over the budget makes a batch of its own.
    """
    widths = np.asarray(widths)
    rows = np.ones(len(widths), np.int64) if rows is None else np.asarray(rows)
    order = np.argsort(-widths, kind="stable")
    cost, count = padded_cost(widths[order]).tolist(), rows[order].tolist()
    batches: list[np.ndarray] = []
    start, used_rows = 0, 0
    for end in range(len(order)):
        # the batch's first is its widest, so rows × its cost is the batch's size
        if end > start and (used_rows + count[end]) * cost[start] > tokens_per_batch:
            batches.append(order[start:end])
            start, used_rows = end, 0
        used_rows += count[end]
    if len(order):
        batches.append(order[start:])
    return batches


def packed_batches(tokens, tokens_per_batch: int) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches of at most ``tokens_per_batch`` real tokens (no padding).

    First-fit-decreasing in linear time: each batch takes the longest remaining sequences while
    they fit, then is topped up with the shortest remaining ones, so a batch is full to within
    the shortest sequence left. A sequence over the budget makes a batch of its own.
    """
    tokens = np.asarray(tokens)
    order = np.argsort(-tokens, kind="stable")
    sizes = tokens[order].tolist()
    batches: list[np.ndarray] = []
    front, back = 0, len(order) - 1
    while front <= back:
        used, start = sizes[front], front
        front += 1
        while front <= back and used + sizes[front] <= tokens_per_batch:
            used += sizes[front]
            front += 1
        taken_from_back = []
        while front <= back and used + sizes[back] <= tokens_per_batch:
            used += sizes[back]
            taken_from_back.append(back)
            back -= 1
        batches.append(np.concatenate([order[start:front], order[taken_from_back]]))
    return batches
