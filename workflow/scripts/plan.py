"""Rule plan: which rank embeds which distinct sequences, balanced by predicted cost."""

import logging
import os
import sys
from pathlib import Path

from esmshard import EsmShardError, logs
from esmshard.index import SequenceIndex
from esmshard.model import architecture, checkpoint_digest
from esmshard.outputs import OutputSpec
from esmshard.plan import Plan, balance, distinct, imbalance, sequence_costs, write_plan

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.plan")
settings = snakemake.params.settings
checkpoint = Path(snakemake.input.checkpoint)
try:
    shape = architecture(checkpoint)
    spec = OutputSpec.resolve(settings["layers"], settings["pooling"], shape.layers, settings["long_sequences"],
                              settings["window_overlap"])
except (EsmShardError, ValueError) as error:
    log.error("%s", error if isinstance(error, EsmShardError) else f"config: {error}")
    sys.exit(1)
index = SequenceIndex(Path(snakemake.input.index).parent)
position, source = distinct(index.digests())
lengths = index.lengths[position]
costs = sequence_costs(lengths, shape.embed_dim, spec.window_counts(lengths))
ranks, rank_costs = balance(costs, snakemake.params.world_size)
stat = os.stat(checkpoint)
model = {"path": str(checkpoint.resolve()), "digest": checkpoint_digest(checkpoint), "size": stat.st_size,
         "mtime_ns": stat.st_mtime_ns, "num_layers": shape.layers, "embed_dim": shape.embed_dim}
write_plan(snakemake.output.plan, Plan(ranks, position, source, len(rank_costs), index.fingerprint, model), rank_costs)
log.info("%d sequences, %d distinct; model %s (%d layers, width %d, content %s)", len(index), len(position),
         checkpoint, shape.layers, shape.embed_dim, model["digest"])
for rank, cost in enumerate(rank_costs):
    log.info("rank %d: %d sequences, predicted cost %.4g", rank, int((ranks == rank).sum()), cost)
log.info("rank cost max/mean: %.4f over %d ranks", imbalance(rank_costs), len(rank_costs))
