"""Token-budget batches over length-sorted sequences.

Sizes are in tokens and already include each piece's BOS and EOS; a long protein cut into
windows (``outputs.py``) counts all its windows, which always share a batch.
"""

import numpy as np


def padded_batches(widths, tokens_per_batch: int, rows=None) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches whose padded size (rows × widest) fits the budget.

    ``widths``: tokens of each sequence's (longest) piece; ``rows``: pieces per sequence (1 when
    None). Sequences are taken widest first, so a batch holds similar lengths and little
    padding; a sequence over the budget makes a batch of its own.
    """
    widths = np.asarray(widths)
    rows = np.ones(len(widths), np.int64) if rows is None else np.asarray(rows)
    order = np.argsort(-widths, kind="stable")
    width, count = widths[order].tolist(), rows[order].tolist()
    batches: list[np.ndarray] = []
    start, used_rows = 0, 0
    for end in range(len(order)):
        # width[start] is the widest of the batch, so rows × width[start] is its size
        if end > start and (used_rows + count[end]) * width[start] > tokens_per_batch:
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
