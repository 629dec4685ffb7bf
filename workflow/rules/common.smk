import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "scripts"))

from snakemake.logging import logger

from esmshard.architectures import ESM2_MODELS
from esmshard.gpu import count_visible_gpus
from esmshard.rank import read_token


def resolve_world_size():
    """config world_size, else the GPUs visible where the workflow is planned (at least 1).

    The planning process passes the number to the jobs it starts (envvars below), so that a
    job on another node, which sees other GPUs, plans with the same number.
    """
    if config.get("world_size"):
        world_size = int(config["world_size"])
    elif not workflow.is_main_process and "ESMSHARD_WORLD_SIZE" in os.environ:
        world_size = int(os.environ["ESMSHARD_WORLD_SIZE"])
    else:
        world_size = max(1, count_visible_gpus())
    os.environ["ESMSHARD_WORLD_SIZE"] = str(world_size)
    return world_size


def check_model(model):
    if not (model in ESM2_MODELS or Path(model).expanduser().is_file()):
        raise ValueError(
            f"config 'model': {model!r} is neither an existing checkpoint file nor a "
            f"released ESM-2 model ({', '.join(ESM2_MODELS)})"
        )


def warn_without_params_trigger():
    # A rank that failed on its last attempt is retried through a changed params value.
    if "PARAMS" not in {trigger.name for trigger in workflow.rerun_triggers}:
        logger.warning(
            "esmshard: --rerun-triggers without 'params': ranks that failed will not be "
            "retried by a plain rerun"
        )


WORLD_SIZE = resolve_world_size()


envvars:
    "ESMSHARD_WORLD_SIZE",


RANKS = list(range(WORLD_SIZE))
check_model(config["model"])


def status_file(rank):
    return f"results/status/rank_{rank}.json"


def token_file(rank):
    return f"results/status/rank_{rank}.token"


def rank_token(wildcards):
    """Changes when the rank's last attempt failed, which makes the next run retry the rank."""
    return read_token(token_file(wildcards.rank))


def embed_settings():
    return {
        "model": config["model"],
        "layers": config["layers"],
        "pooling": config["pooling"],
        "long_sequences": config["long_sequences"],
        "window_overlap": config["window_overlap"],
        "precision": config["precision"],
        "dtype": config["dtype"],
        "tokens_per_batch": config["tokens_per_batch"],
        "engine": config["engine"],
        "compile": config["compile"],
        "progress_seconds": config["progress_seconds"],
        "chunk_sequences": config["chunk_sequences"],
        "chunk_seconds": config["chunk_seconds"],
    }
