"""Rule index: validate the FASTA input, write the sequence index and the rank plan."""

import logging
import sys
from pathlib import Path

from esmshard import EsmShardError, logs
from esmshard.fasta import expand_fasta_paths
from esmshard.index import SequenceIndex, build_index
from esmshard.outputs import window_counts
from esmshard.plan import balance, embed_dim_for, imbalance, sequence_costs, write_plan

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.index")
index_dir = Path(snakemake.output.index).parent
try:
    paths = expand_fasta_paths(snakemake.params.fasta)
    log.info("indexing %d FASTA file(s): %s", len(paths), ", ".join(map(str, paths)))
    summary = build_index(paths, index_dir, snakemake.params.invalid_residues)
except EsmShardError as error:
    log.error("%s", error)
    sys.exit(1)
log.info("%d sequences, %d residues, fingerprint %s", summary.n_sequences, summary.n_residues, summary.fingerprint)
if summary.replaced_residues:
    log.warning(
        "replaced %d residues outside ESM-2's alphabet with X (invalid_residues: replace)",
        summary.replaced_residues,
    )

lengths = SequenceIndex(index_dir).lengths
windows = window_counts(lengths, snakemake.params.long_sequences, snakemake.params.window_overlap)
costs = sequence_costs(lengths, embed_dim_for(snakemake.params.model), windows)
ranks, rank_costs = balance(costs, snakemake.params.world_size)
write_plan(snakemake.output.plan, ranks, rank_costs, summary.fingerprint)
for rank, cost in enumerate(rank_costs):
    log.info("rank %d: %d sequences, predicted cost %.4g", rank, int((ranks == rank).sum()), cost)
log.info("rank cost max/mean: %.4f over %d ranks", imbalance(rank_costs), len(rank_costs))
