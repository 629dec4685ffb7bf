"""Rule embed: one rank. Leases a GPU before CUDA starts, embeds the rank's sequences into its
shard (resuming from chunks an earlier attempt left), and records the outcome in the status
file that the rule declares."""

import logging
import os
import socket
import sys
from pathlib import Path

from esmshard import logs
from esmshard.gpu import pin_gpu
from esmshard.rank import (
    RankSettings,
    Stopped,
    TimedOut,
    disarm_timeout,
    handle_stop_signals,
    parse_duration,
    record_failure,
    run_rank,
    write_status,
)

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.embed")
rank = int(snakemake.wildcards.rank)
attempt, attempts = int(snakemake.resources.attempt), int(snakemake.params.attempts)
handle_stop_signals(parse_duration(snakemake.params.timeout))

lease = pin_gpu(snakemake.params.gpu_lock_dir)
where = {"host": socket.gethostname(), "gpu": lease.gpu, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
log.info(
    "rank %d, attempt %d of %d, device %s, host %s%s", rank, attempt, attempts,
    f"GPU {lease.gpu}" if lease.gpu else "CPU", where["host"],
    f", SLURM job {where['slurm_job_id']}" if where["slurm_job_id"] else "",
)
try:
    import torch

    torch.set_num_threads(snakemake.threads)
    settings = RankSettings(**snakemake.params.settings)
    index_dir = Path(snakemake.input.index).parent
    stats = run_rank(index_dir, snakemake.input.plan, rank, snakemake.params.shard, snakemake.params.work_dir, settings)
    disarm_timeout()
except Stopped as stop:
    log.error("rank %d %s; finished work is kept in chunks and a rerun resumes from it", rank, stop)
    sys.exit(128 + stop.signum)
except TimedOut as error:
    log.error("rank %d ran past its timeout (%s); finished work is kept in chunks", rank, snakemake.params.timeout)
    record_failure(snakemake.output.status, snakemake.params.token_file, rank, error, attempt)
    sys.exit(0)
except Exception as error:
    if attempt < attempts:
        log.error("rank %d failed on attempt %d of %d: %s; snakemake will retry", rank, attempt, attempts, error)
        raise
    log.exception("rank %d failed on its last attempt (%d); recording the failure", rank, attempt)
    record_failure(snakemake.output.status, snakemake.params.token_file, rank, error, attempt)
    sys.exit(0)
write_status(snakemake.output.status, rank=rank, ok=True, attempt=attempt, shard=snakemake.params.shard, **where, **stats)
