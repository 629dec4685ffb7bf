import numpy as np

from esmshard.batching import packed_batches, padded_batches


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
