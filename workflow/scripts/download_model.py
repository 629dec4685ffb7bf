"""Rule download_model: a released ESM-2 model into torch.hub's cache, once, checked before it lands."""

import logging
import sys
from pathlib import Path

from esmshard import EsmShardError, logs
from esmshard.model import download

logs.setup(snakemake.log[0])
try:
    download(snakemake.params.model, Path(snakemake.output.checkpoint))
except EsmShardError as error:
    logging.getLogger("esmshard.download").error("%s", error)
    sys.exit(1)
