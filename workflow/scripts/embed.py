"""Rule embed: one rank. Leases a GPU before CUDA starts, embeds the rank's sequences into its
shard, and records the outcome in the status file that the rule declares."""

import logging
import sys
from pathlib import Path

from esmshard import logs
from esmshard.gpu import pin_gpu
from esmshard.rank import RankSettings, record_failure, run_rank, write_status

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.embed")
rank = int(snakemake.wildcards.rank)
attempt, attempts = int(snakemake.resources.attempt), int(snakemake.params.attempts)

lease = pin_gpu(snakemake.params.gpu_lock_dir)
log.info("rank %d, attempt %d of %d, device %s", rank, attempt, attempts, f"GPU {lease.gpu}" if lease.gpu else "CPU")
try:
    import torch

    torch.set_num_threads(snakemake.threads)
    settings = RankSettings(**snakemake.params.settings)
    stats = run_rank(Path(snakemake.input.index).parent, snakemake.input.plan, rank, snakemake.params.shard, settings)
except Exception as error:
    if attempt < attempts:
        log.error("rank %d failed on attempt %d of %d: %s; snakemake will retry", rank, attempt, attempts, error)
        raise
    log.exception("rank %d failed on its last attempt (%d); recording the failure", rank, attempt)
    record_failure(snakemake.output.status, snakemake.params.token_file, rank, error, attempt)
    sys.exit(0)
write_status(snakemake.output.status, rank=rank, ok=True, attempt=attempt, shard=snakemake.params.shard, **stats)
