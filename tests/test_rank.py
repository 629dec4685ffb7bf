"""A rank saving its work while it stops."""

import signal
import time

import h5py
import numpy as np
import pytest

from esmshard import rank
from esmshard.outputs import OutputSpec
from esmshard.stopping import TimedOut, handle_stop_signals, signals_deferred
from esmshard.store import SegmentWriter, Store, settings_identity
from esmshard.work import RankWork


def test_a_stop_while_a_segment_is_written_keeps_the_next_batches_for_the_rank_to_save(tmp_path):
    """The rank's background writer and a stop signal: batches waiting for the writer are never
    dropped; the rank's stop path saves them after the segment being written is on disk."""
    spec = OutputSpec.resolve([-1], ["mean"], 2, max_residues=1022)
    lengths = np.array([5, 7, 9, 11])
    digests = np.array([bytes([i]) * 16 for i in range(4)], dtype="V16")
    identity = settings_identity("digest", "esm2", spec, "float32", "packed")
    work = RankWork(
        None, 0, 1, np.arange(4), np.array(list("abcd"), object), lengths, digests, spec, 4, {}, identity, "float32"
    )
    store = Store(tmp_path, identity, spec, 4, "float32")
    writer = SegmentWriter(store)

    def slow_first_segment():
        time.sleep(1.0)
        return digests[:2], lengths[:2], {"mean/layer_2": np.zeros((2, 4), np.float32)}

    writer.submit(slow_first_segment)
    pending = [(np.array([3, 2]), {"mean/layer_2": np.arange(8, dtype=np.float32).reshape(2, 4)})]
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    try:
        handle_stop_signals(timeout_seconds=0.2)  # the time limit's alarm comes while the writer works
        with pytest.raises(TimedOut):
            rank._save(writer, work, pending)
        assert len(pending) == 1  # not handed over, not lost
        with signals_deferred():  # as compute's stop path does
            rank._save(writer, work, pending)
            writer.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    saved = Store(tmp_path, identity, spec, 4, "float32")
    assert not pending and (saved.find(digests)[0] >= 0).all() and len(saved.segments) == 2
    (second,) = [path for path in saved.segments if h5py.File(path)["lengths"][0] == 9]
    with h5py.File(second) as h5:  # in row order: sequence 2 (digest 2) first
        assert h5["lengths"][:].tolist() == [9, 11] and h5["mean/layer_2"][:, 0].tolist() == [4.0, 0.0]
