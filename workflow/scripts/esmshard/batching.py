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
