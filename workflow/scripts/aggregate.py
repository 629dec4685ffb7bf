"""Rule aggregate: merge the shards of the ranks that succeeded and report what is missing."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import EsmShardError, logs
from esmshard.aggregate import aggregate
from esmshard.work import RankSettings

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.aggregate")
try:
    manifest = aggregate(
        Path(snakemake.input.index).parent,
        snakemake.input.plan,
        snakemake.input.shards,
        snakemake.input.statuses,
        RankSettings.from_config(snakemake.params.settings),
        snakemake.output.embeddings,
        snakemake.output.manifest,
        snakemake.output.missing,
        require_complete=snakemake.params.require_complete,
        compression=snakemake.params.compression,
    )
except EsmShardError as error:
    log.error("%s", error)
    sys.exit(1)
log.info(
    "%d of %d sequences embedded into %s (%d distinct sequences computed by this run, %d taken from the store)",
    manifest["embedded"],
    manifest["sequences"],
    manifest["output"],
    manifest["computed"],
    manifest["reused"],
)
