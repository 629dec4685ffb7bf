"""Rule plan: which rank embeds which distinct sequences, balanced by predicted cost."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import EsmShardError, logs
from esmshard.plan import make_plan

logs.setup(snakemake.log[0])
try:
    make_plan(
        Path(snakemake.input.index).parent,
        snakemake.config["model"],  # its files are this job's input
        snakemake.config["model_type"],
        snakemake.params.settings,
        snakemake.params.world_size,
        snakemake.output.plan,
    )
except EsmShardError as error:
    logging.getLogger("esmshard.plan").error("%s", error)
    sys.exit(1)
