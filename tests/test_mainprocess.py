"""The workflow's hooks in Snakemake's main process (the results folder's lock: test_api.py,
test_resume.py)."""

import os
import signal
import subprocess
import sys
import threading

from esmshard.mainprocess import cancel_snakemake_timers, failed_jobs, first_error


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


# Snakemake 9's own words for two jobs of one rule: job 1 failed, was restarted and finished; job 2
# failed on both attempts. Then a job whose process died with a traceback that no logger wrote,
# and jobs whose processes were killed, crashed, or exited without a word.
SNAKEMAKE_OUTPUT = """\
CalledProcessError in file "/w/Snakefile", line 7:
Error in rule embed:
    jobid: 1
    log: logs/embed/rank_0.log (check log file(s) for error details)
Trying to restart job 1.
Finished jobid: 1 (Rule: embed)
Error in rule embed:
    jobid: 2
    log: logs/embed/rank_1.log (check log file(s) for error details)
Trying to restart job 2.
Error in rule embed:
    jobid: 2
    log: logs/embed/rank_1.log (check log file(s) for error details)
Error in rule aggregate:
    message: None
    jobid: 3
    output: results/embeddings.h5
    log: logs/aggregate.log, logs/other.log (check log file(s) for error details)
Command 'set -euo pipefail;  python .snakemake/scripts/tmp1.plan.py' died with <Signals.SIGKILL: 9>.
Error in rule plan:
    jobid: 4
    log: logs/plan.log (check log file(s) for error details)
Command 'set -euo pipefail;  python .snakemake/scripts/tmp2.index.py' returned non-zero exit status 139.
Error in rule index:
    jobid: 5
    log: logs/index.log (check log file(s) for error details)
Command 'set -euo pipefail;  python .snakemake/scripts/tmp3.download_model.py' returned non-zero exit status 1.
Error in rule download_model:
    jobid: 6
    log: logs/download_model.log (check log file(s) for error details)
Exiting because a job execution failed. Look above for error messages
"""


def test_each_job_that_failed_for_good_is_named_with_its_logs_first_error(tmp_path):
    (tmp_path / "logs/embed").mkdir(parents=True)
    (tmp_path / "logs/embed/rank_1.log").write_text(
        "2026-12-07 02:00:00.000 INFO rank 1, attempt 2 of 2\n"
        "2026-12-07 02:00:01.000 ERROR rank 1: CUDA error: an illegal memory access\n"
        "2026-12-07 02:00:01.000 ERROR second error\n"
    )
    (tmp_path / "logs/other.log").write_text(
        'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: [Errno 28] No space left\n'
    )
    (tmp_path / "logs/plan.log").write_text("2026-12-07 02:00:00.000 INFO planning\n")
    (tmp_path / "logs/index.log").write_text(  # faulthandler's report (logs.setup)
        "2026-12-07 02:00:00.000 INFO indexing\nFatal Python error: Segmentation fault\n\n"
        'Current thread 0x00007f (most recent call first):\n  File "index.py", line 9 in <module>\n'
    )
    assert failed_jobs(SNAKEMAKE_OUTPUT, tmp_path) == [
        "embed failed: rank 1: CUDA error: an illegal memory access (logs/embed/rank_1.log)",
        "aggregate failed: OSError: [Errno 28] No space left (logs/other.log)",
        "plan failed (killed by SIGKILL); its log records no error (logs/plan.log)",
        "index failed: Fatal Python error: Segmentation fault (logs/index.log)",
        "download_model failed (exit status 1); its log records no error (logs/download_model.log)",
    ]
    assert failed_jobs("Nothing to be done.\n") == []


def test_a_job_that_crashes_in_native_code_names_the_crash(tmp_path):
    log = tmp_path / "job.log"
    script = f"from esmshard import logs\nlogs.setup({str(log)!r})\nimport faulthandler\nfaulthandler._sigsegv()\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    crashed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert crashed.returncode == -signal.SIGSEGV
    assert first_error(log) == "Fatal Python error: Segmentation fault"
