"""Rule plan: which rank embeds which distinct sequences, balanced by predicted cost."""

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["ESMSHARD_PACKAGE"])  # this workflow's esmshard (rules/package.smk)

from esmshard import EsmShardError, logs
from esmshard.architectures import FAMILIES, check_model, checkpoint_identity, resolve_model
from esmshard.index import SequenceIndex
from esmshard.outputs import OutputSpec
from esmshard.plan import (
    RANDOM_WEIGHTS_WARNING,
    Plan,
    balance,
    distinct,
    imbalance,
    sequence_costs,
    space_warning,
    write_plan,
)

logs.setup(snakemake.log[0])
log = logging.getLogger("esmshard.plan")
settings = snakemake.params.settings
try:
    checkpoint = resolve_model(snakemake.config["model"])  # its files are this job's input
    check_model(snakemake.config["model_type"], settings["pooling"], checkpoint)
    model = checkpoint_identity(checkpoint)
    spec = OutputSpec.resolve(
        settings["layers"],
        settings["pooling"],
        model["num_layers"],
        settings["long_sequences"],
        settings["window_overlap"],
    )
except (EsmShardError, ValueError) as error:
    log.error("%s", error if isinstance(error, EsmShardError) else f"config: {error}")
    sys.exit(1)
index = SequenceIndex(Path(snakemake.input.index).parent)
position, source = distinct(index.digests())
lengths = index.lengths[position]
costs = sequence_costs(lengths, model["embed_dim"], spec.window_counts(lengths))
ranks, rank_costs = balance(costs, snakemake.params.world_size)
write_plan(snakemake.output.plan, Plan(ranks, position, source, len(rank_costs), index.fingerprint, model), rank_costs)
log.info(
    "%d sequences, %d distinct; model %s (%s, %d layers, width %d, content %s)",
    len(index),
    len(position),
    checkpoint.location,
    FAMILIES[model["family"]],
    model["num_layers"],
    model["embed_dim"],
    model["digest"],
)
if model["random_weights"]:
    log.warning(RANDOM_WEIGHTS_WARNING, checkpoint.location)
for rank, cost in enumerate(rank_costs):
    log.info("rank %d: %d sequences, predicted cost %.4g", rank, int((ranks == rank).sum()), cost)
log.info("rank cost max/mean: %.4f over %d ranks", imbalance(rank_costs), len(rank_costs))
warning = space_warning(
    Path(snakemake.output.plan).parent, spec, index.lengths, position, model["embed_dim"], settings["dtype"]
)
if warning:  # before any GPU work: the ranks check each write again and fail cleanly
    log.warning("%s", warning)
