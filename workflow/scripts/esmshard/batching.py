"""Token-budget batches over length-sorted sequences."""

import numpy as np


def padded_batches(lengths, tokens_per_batch: int, extra_tokens: int = 2) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches whose padded size (count × longest) fits the budget.

    Sequences are taken longest first, so a batch holds similar lengths and little padding; a
    sequence longer than the budget makes a batch of its own. ``lengths`` must already be capped
    at the model's maximum; ``extra_tokens`` counts BOS and EOS.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    padded = (lengths[order] + extra_tokens).tolist()
    batches: list[np.ndarray] = []
    start = 0
    for end in range(1, len(order) + 1):
        # padded[start] is the longest of the batch, so count × padded[start] is its size
        if end == len(order) or (end - start + 1) * padded[start] > tokens_per_batch:
            batches.append(order[start:end])
            start = end
    return batches


def packed_batches(lengths, tokens_per_batch: int, extra_tokens: int = 2) -> list[np.ndarray]:
    """Split positions 0..n-1 into batches of at most ``tokens_per_batch`` real tokens (no padding).

    First-fit-decreasing in linear time: each batch takes the longest remaining sequences while
    they fit, then is topped up with the shortest remaining ones, so a batch is full to within
    the shortest sequence left. A sequence over the budget makes a batch of its own.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    tokens = (lengths[order] + extra_tokens).tolist()
    batches: list[np.ndarray] = []
    front, back = 0, len(order) - 1
    while front <= back:
        used, start = tokens[front], front
        front += 1
        while front <= back and used + tokens[front] <= tokens_per_batch:
            used += tokens[front]
            front += 1
        taken_from_back = []
        while front <= back and used + tokens[back] <= tokens_per_batch:
            used += tokens[back]
            taken_from_back.append(back)
            back -= 1
        batches.append(np.concatenate([order[start:front], order[taken_from_back]]))
    return batches
