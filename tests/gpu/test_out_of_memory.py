"""Real CUDA out-of-memory errors: a big batch is split in halves (engine.py,
PackedEngine._outputs_splitting_on_oom) and gives the vectors of an unsplit run; a window that
does not fit even alone is computed on the CPU."""

import contextlib
import gc
import logging

import torch

from esmshard.engine import PackedEngine
from esmshard.outputs import OutputSpec

from .helpers import assert_rows_close, lognormal_lengths, random_residues


def test_a_batch_that_does_not_fit_is_split_and_gives_the_same_vectors(cuda, t6, caplog):
    network, alphabet = t6
    spec = OutputSpec.resolve([3, -1], ["mean", "bos"], network.num_layers, max_residues=1022)
    engine = PackedEngine(network, alphabet, cuda, "bfloat16", spec)
    residues = random_residues(lognormal_lengths(400, seed=6, median=300, cap=1022), seed=7)  # ~150k tokens

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    whole = engine.embed(residues)
    working = torch.cuda.max_memory_allocated() - before  # what the batch needs beyond the model
    # From now on this process may hold 60% of that beyond what it holds now: too little for
    # the batch, enough for each half of it.
    torch.cuda.empty_cache()
    limit = torch.cuda.memory_reserved() + 0.6 * working
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        with caplog.at_level(logging.WARNING, logger="esmshard.engine"):
            split = engine.embed(residues)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()

    splits = [r for r in caplog.records if "out of GPU memory" in r.getMessage()]
    assert engine.splits >= 1 and len(splits) == engine.splits, f"no split: the batch fitted in {limit / 2**30:.2f} GiB"
    assert engine.splits <= 3, f"{engine.splits} splits: the halves should fit in 60% of the whole batch's memory"
    for name in spec.names:
        assert_rows_close(split[name], whole[name], "bfloat16", f"{name}, after {len(splits)} split(s)")


def test_a_window_that_does_not_fit_even_alone_is_computed_on_the_cpu(cuda, t6, caplog):
    network, alphabet = t6
    spec = OutputSpec.resolve(
        [-1], ["mean", "per_residue"], network.num_layers, long_sequences="window", max_residues=1022
    )
    engine = PackedEngine(network, alphabet, cuda, "bfloat16", spec)
    residues = random_residues([1022, 2500, 30], seed=8)  # 1 window, 4 (overlapping by 512 or more), 1
    whole = engine.embed(residues)
    with caplog.at_level(logging.WARNING, logger="esmshard.engine"), no_room_left():
        on_cpu = engine.embed(residues)
    warnings = [r for r in caplog.records if "does not fit in GPU memory even alone" in r.getMessage()]
    assert engine.cpu_batches == len(warnings) == 6 and engine.stats()["cpu_batches"] == 6
    for name in spec.names:
        assert_rows_close(on_cpu[name], whole[name], "bfloat16", f"{name}, on the CPU")


@contextlib.contextmanager
def no_room_left():
    """No new GPU memory for this process (its limit: what it holds now), and what its allocator
    holds free taken by filler tensors: every allocation fails meanwhile."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(torch.cuda.memory_reserved() / total)
    filler, size = [], 2**30
    while size >= 512:
        try:
            filler.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            size //= 2
    try:
        yield
    finally:
        del filler
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
