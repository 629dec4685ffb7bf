import numpy as np

from esmshard.batching import packed_batches, padded_batches, planned_batches
from esmshard.outputs import OutputSpec


def test_batches_fit_the_budget_and_cover_every_sequence_once():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, 2000).astype(int), 1, 1022)
    batches = padded_batches(lengths + 2, 8192)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * (lengths[batch].max() + 2) <= 8192
    # longest first and similar lengths together
    assert lengths[batches[0]].max() == lengths.max()


def test_a_padded_batch_of_long_pieces_holds_no_more_attention_than_one_of_1024_wide_pieces():
    # ProtT5 embeds up to 10,000 residues: 64 rows of 4,000 would hold 16x the attention of 64 of 1,000
    widths = np.array([4000] * 64 + [1000] * 64)
    batches = padded_batches(widths, 65536)
    for batch in batches:
        rows, widest = len(batch), widths[batch].max()
        assert rows * widest * max(widest, 1024) <= 65536 * 1024  # [rows, L, L] within 64 rows of 1024
    assert [len(b) for b in batches if widths[b].max() == 1000] == [64]  # up to 1024 wide: as before


def test_a_sequence_over_the_budget_gets_a_batch_of_its_own():
    batches = padded_batches(np.array([10, 1000, 10]) + 2, 500)
    assert [b.tolist() for b in batches] == [[1], [0, 2]]


def test_packed_batches_fill_the_budget_without_padding():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, 5000).astype(int), 1, 1022)
    budget = 32768
    batches = packed_batches(lengths + 2, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    tokens = [int((lengths[b] + 2).sum()) for b in batches]
    assert max(tokens) <= budget
    # as few batches as the tokens allow: no batch wastes more than a short sequence's worth
    assert len(batches) == int(np.ceil((lengths + 2).sum() / budget))
    assert np.mean(tokens[:-1]) > 0.995 * budget


def test_packed_batch_over_budget_stands_alone():
    batches = packed_batches(np.array([5, 2000, 5, 7]) + 2, 1000)
    assert [sorted(b.tolist()) for b in batches] == [[1], [0, 2, 3]]


def test_windowed_sequences_count_every_window():
    widths, rows = np.array([1024, 300, 1024, 50]), np.array([4, 1, 1, 1])
    batches = padded_batches(widths, 5 * 1024, rows)
    assert [b.tolist() for b in batches] == [[0, 2], [1, 3]]
    for batch in batches:
        assert rows[batch].sum() * widths[batch].max() <= 5 * 1024


def _sizes_and_windows(batches, lengths, spec):
    """Each batch's real and padded tokens, counted from its pieces; every sequence's windows, by batch."""
    width, counts = spec.piece_tokens(lengths), spec.window_counts(lengths)
    real, padded, seen = [], [], [[] for _ in lengths]
    for batch in batches:
        windows = np.stack([0 * counts, counts], 1)[batch.positions] if batch.windows is None else batch.windows
        rows = windows[:, 1] - windows[:, 0]
        real.append(int((rows * width[batch.positions]).sum()))
        padded.append(int(rows.sum() * width[batch.positions].max()))
        for position, (first, end) in zip(batch.positions.tolist(), windows.tolist()):
            seen[position] += range(first, end)
    return real, padded, seen


def test_a_long_protein_spreads_its_windows_over_batches_within_the_budget():
    """A 20,000-residue protein among short ones: no batch over 4096 tokens, every window once."""
    rng = np.random.default_rng(2)
    lengths = np.concatenate([[20_000], rng.integers(1, 1500, 300)])
    for overlap in (512, 1000):
        spec = OutputSpec.resolve([-1], ["mean"], 2, "window", overlap, max_residues=1022)
        counts = spec.window_counts(lengths)
        for padded in (False, True):
            batches = planned_batches(lengths, spec, 4096, padded)
            real, padded_size, seen = _sizes_and_windows(batches, lengths, spec)
            assert max(padded_size if padded else real) <= 4096
            assert [b.tokens for b in batches] == (padded_size if padded else real)
            assert all(sorted(s) == list(range(c)) for s, c in zip(seen, counts))
            assert all(len(set(b.positions.tolist())) == len(b.positions) for b in batches)
            assert sum(b.windows is not None for b in batches) >= counts[0] // 4


def test_sequences_that_fit_batch_as_whole_items():
    """Without a protein over the budget the batches are those of the whole-sequence batchers."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 3000, 500)
    spec = OutputSpec.resolve([-1], ["mean"], 2, "window", 512, max_residues=1022)
    packed = planned_batches(lengths, spec, 16384)
    assert [b.positions.tolist() for b in packed] == [b.tolist() for b in packed_batches(spec.tokens(lengths), 16384)]
    padded = planned_batches(lengths, spec, 16384, padded=True)
    want = padded_batches(spec.piece_tokens(lengths), 16384, spec.window_counts(lengths))
    assert [b.positions.tolist() for b in padded] == [b.tolist() for b in want]
    assert all(b.windows is None for b in packed + padded)


def test_a_window_over_the_budget_makes_a_batch_of_its_own():
    spec = OutputSpec.resolve([-1], ["mean"], 2, "window", 512, max_residues=1022)
    batches = planned_batches(np.array([3000, 10]), spec, 1000)
    assert [(b.positions.tolist(), None if b.windows is None else b.windows.tolist()) for b in batches] == [
        ([0], [[k, k + 1]]) for k in range(5)
    ] + [([1], None)]
    assert [b.tokens for b in batches] == [1024] * 5 + [12]
