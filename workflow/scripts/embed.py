"""Rule embed: one rank. Its planned sequences into its shard, through the store (a GPU is
leased, before CUDA starts, only when there is something to compute); the outcome goes to its
status file, with the shard's stamp and the store segments it reads (status.retry_failure).

A failure, a stop signal (also while waiting for a GPU) or the rank's timeout fails the job on an
attempt before the last, so that Snakemake retries it (resuming from the store); on the last
attempt the job ends successfully with a failure shard and a failed status: the others' results
are merged, and the next run retries this rank, resuming from the store."""

import gc
import logging
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import logs
from esmshard.rank import run_rank
from esmshard.shard import write_failure_shard
from esmshard.status import failure_status, write_status, write_success
from esmshard.stopping import Stopped, TimedOut, disarm_timeout, handle_stop_signals, parse_duration
from esmshard.work import RankSettings

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.embed")
config = snakemake.config
rank = int(snakemake.wildcards.rank)
attempt, attempts = int(snakemake.resources.attempt), int(snakemake.resources.attempts)
retry_input = snakemake.input.get("retry")  # results/status/rank_<r>.retry_<failure>, after a failure
retried = Path(retry_input).name.rsplit(".retry_", 1)[1] if retry_input else None
where = {
    "host": socket.gethostname(),
    "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
}  # as the scheduler gave them
log.info(
    "rank %d, attempt %d of %d, host %s%s",
    rank,
    attempt,
    attempts,
    where["host"],
    f", SLURM job {where['slurm_job_id']}" if where["slurm_job_id"] else "",
)


def record_failure_for_good(error):
    """The job ends successfully, with a failure shard and a failed status (which the next run retries)."""
    status = failure_status(rank, error, attempt, **where)
    write_failure_shard(snakemake.output.shard, rank, status["error"])
    write_status(snakemake.output.status, **status)
    sys.exit(0)


try:
    handle_stop_signals(parse_duration(config["timeout"]))
    settings = RankSettings.from_config(config, threads=snakemake.threads)
    stats = run_rank(
        os.path.dirname(snakemake.input.index),
        snakemake.input.plan,
        config["model"],
        rank,
        snakemake.output.shard,
        snakemake.params.store,
        settings,
        # the last aggregation could not read this rank's rows: check the store's checksums first
        verify_store=bool(retried and retried.startswith("rejected")),
    )
    disarm_timeout()
except (Stopped, TimedOut) as stop:
    disarm_timeout()
    reason = f"ran past its timeout ({config['timeout']})" if isinstance(stop, TimedOut) else str(stop)
    log.error("rank %d %s; finished work is kept in the store and a rerun resumes from it", rank, reason)
    if attempt < attempts:
        log.error("snakemake will retry rank %d (attempt %d of %d)", rank, attempt + 1, attempts)
        sys.exit(1)
    record_failure_for_good(stop)
except Exception as error:
    disarm_timeout()
    if attempt < attempts:
        log.error("rank %d failed on attempt %d of %d: %s; snakemake will retry", rank, attempt, attempts, error)
        raise
    log.exception("rank %d failed on its last attempt (%d); recording the failure", rank, attempt)
    record_failure_for_good(error)
write_success(
    snakemake.output.status,
    snakemake.output.shard,
    rank,
    stats,
    attempt=attempt,
    retried=retried,
    **where,
)
# The job ends here: keep the interpreter's last garbage collection from walking every object
# torch and the engine made (the outputs are written and closed); the operating system frees them.
gc.freeze()
