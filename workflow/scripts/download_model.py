"""Rule download_model: a released ESM-2 model into torch.hub's cache, or a hub id into the
Hugging Face cache, once, checked to be the ESM-2 named before it lands."""

import logging
import os
import sys

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import EsmShardError, logs
from esmshard.model import download

logs.setup(snakemake.log[0])
try:
    download(snakemake.params.model)
except EsmShardError as error:
    logging.getLogger("esmshard.download").error("%s", error)
    sys.exit(1)
