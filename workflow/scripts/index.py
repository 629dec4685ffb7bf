"""Rule index: validate the FASTA input and write the sequence index."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import EsmShardError, logs
from esmshard.index import build_index

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.index")
paths = [Path(path) for path in snakemake.input.fasta]
log.info("indexing %d FASTA file(s): %s", len(paths), ", ".join(map(str, paths)))
try:
    summary = build_index(paths, Path(snakemake.output.index).parent, snakemake.params.invalid_residues)
except EsmShardError as error:
    log.error("%s", error)
    sys.exit(1)
log.info("%d sequences, %d residues, fingerprint %s", summary.n_sequences, summary.n_residues, summary.fingerprint)
if summary.replaced_residues:
    log.warning(
        "replaced %d residues outside the 25 residue letters with X (invalid_residues: replace)",
        summary.replaced_residues,
    )
