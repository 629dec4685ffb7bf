"""The workflow's hooks in Snakemake's main process (the results folder's lock: test_api.py,
test_resume.py)."""

import threading

from esmshard.mainprocess import cancel_snakemake_timers


def test_only_snakemakes_own_timers_are_cancelled():
    def reschedule():  # stands for the scheduler's own lambda
        pass

    reschedule.__module__ = "snakemake.scheduling.job_scheduler"
    fired = threading.Event()
    snakemakes, ours = threading.Timer(60, reschedule), threading.Timer(0.2, fired.set)
    snakemakes.start(), ours.start()
    try:
        cancel_snakemake_timers()
        snakemakes.join(timeout=5)
        assert not snakemakes.is_alive()  # cancelled: the interpreter need not wait 60 s
        assert fired.wait(timeout=5)  # another module's timer went off as planned
    finally:
        snakemakes.cancel(), ours.cancel()
