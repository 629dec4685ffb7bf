import os
from pathlib import Path

# The package (on sys.path since the Snakefile) is imported here only through modules that need
# the standard library alone: Snakemake parses and lints this workflow without numpy, h5py or torch.
from esmshard import EsmShardError, paths
from esmshard.architectures import check_model, model_inputs, resolve_model
from esmshard.fasta import expand_fasta_paths, fasta_list_key
from esmshard.gpu import count_visible_gpus
from esmshard.mainprocess import cancel_snakemake_timers, failed_jobs, hold_results
from esmshard.progress import Watcher
from esmshard.status import retried, retry_failure
from esmshard.settings import stop
from esmshard.stopping import parse_duration
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import SharedFSUsage
from snakemake.logging import logger


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


WORLD_SIZE = resolve_world_size()


# A rank records its failure (instead of failing its job) on its last attempt, so it needs the
# number of retries: Snakemake's own (--retries, from a profile or the command line; the rules
# leave it alone). Snakemake knows it only once it executes, after parsing, and starts jobs on
# other nodes with --retries 0 (the main process retries; snakemake/spawn_jobs.py): the main
# process passes its number to the jobs (rank_attempts).
os.environ.setdefault("ESMSHARD_RETRIES", "0")


envvars:
    "ESMSHARD_WORLD_SIZE",
    "ESMSHARD_RETRIES",


def rank_attempts(wildcards):
    """How many attempts a rank gets: 1 + rule embed's retries."""
    if workflow.is_main_process and workflow.execution_settings:
        os.environ["ESMSHARD_RETRIES"] = str(rules.embed.rule.restart_times)
    return int(os.environ["ESMSHARD_RETRIES"]) + 1


RANKS = list(range(WORLD_SIZE))


def checked(find, *args):
    """find(*args), where a user's error (a FASTA pattern, a model, a duration) stops the run
    before any job, in one line."""
    try:
        return find(*args)
    except (EsmShardError, ValueError) as error:
        stop(error)


def require_shared_filesystem():
    """The ranks' finished work lives in a store no rule declares, and each rank's shard and
    status are read where the rank wrote them: the jobs must share the working directory's
    filesystem. Without it (--shared-fs-usage leaving out input-output, or a default storage
    provider) the run stops here, in one line."""
    settings = workflow.storage_settings
    if not workflow.is_main_process or settings is None:
        return
    if (
        SharedFSUsage.INPUT_OUTPUT not in settings.shared_fs_usage
        or settings.default_storage_provider
    ):
        stop(
            "esmshard needs a filesystem shared by its jobs (for its store of finished work, the "
            "ranks' shards and status files): keep input-output in --shared-fs-usage (the default) "
            "and set no default storage provider"
        )


require_shared_filesystem()


# User files are taken as given (local): a module's prefix applies to this workflow's own files only.
FASTA_FILES = [
    local(str(path)) for path in checked(expand_fasta_paths, config["fasta"])
]
# Names the FASTA files in order, each by where it is, its size and time: an input of the index,
# so that another list, order or file rebuilds it even where Snakemake's metadata is gone.
FASTA_LIST = f"results/index/fasta_list_{fasta_list_key(FASTA_FILES)}.txt"
# The model's files, an input of every job that reads it: a checkpoint or a Hugging Face
# directory's config.json and weights as given; a released model's file in torch.hub's cache, a
# hub id's refs/main in the Hugging Face cache, made by rule download_model when missing.
MODEL_INPUTS, DOWNLOAD_MODEL = checked(model_inputs, config["model"])
MODEL_FILES = [local(str(path)) for path in MODEL_INPUTS]


def check_model_family():
    """model_type, and BOS pooling, against the model's files, before any job (a model still to
    be downloaded is checked by the plan, after the download)."""
    wanted = config["model_type"] or "bos" in config["pooling"]
    if wanted and not DOWNLOAD_MODEL:
        check_model(
            config["model_type"], config["pooling"], resolve_model(config["model"])
        )


checked(check_model_family)
checked(parse_duration, config["timeout"])  # a bad value stops here, before any job
# Settings that change the numbers: parameters of the rules whose outputs they change. The
# others (batch size, compile, progress, segment sizes, timeout, locks) are read from the config
# by the jobs and rerun nothing.
NUMERIC_SETTINGS = (
    "layers",
    "pooling",
    "long_sequences",
    "window_overlap",
    "precision",
    "dtype",
    "engine",
)


def numeric_settings():
    return {key: config[key] for key in NUMERIC_SETTINGS}


RETRY_MARKER = "results/status/rank_{rank}.retry_{failure}"


def sibling(path, *parts):
    """A path beside the results folder that holds ``path`` (e.g. results/status/x -> results/store)."""
    results = (
        Path(path).parent
        if Path(path).parent.name == "results"
        else Path(path).parent.parent
    )
    return str(results.joinpath(*parts))


def retry_if_failed(wildcards):
    """A rank whose status records a failure or cannot be read, whose shard changed after its job,
    whose shard reads a store segment that is gone, or whose shard the last aggregation rejected
    (status.retry_failure) is retried by the next run: it then needs a new file, named after the
    failure, made by retry_rank."""
    # as on disk (a module's prefix included)
    status = rules.embed.output.status.format(rank=wildcards.rank)
    shard = rules.embed.output.shard.format(rank=wildcards.rank)
    failure = retry_failure(
        status, shard, rules.aggregate.output.manifest, int(wildcards.rank)
    )
    if failure and failure != retried(status):
        warn_without_input_trigger(wildcards.rank)
    # as written in the rule: Snakemake adds a module's prefix to what an input function returns
    return RETRY_MARKER.format(rank=wildcards.rank, failure=failure) if failure else []


WARNED = set()


def warn_without_input_trigger(rank):
    # The retry works through the 'input' rerun trigger (the rank's set of inputs changed);
    # without it snakemake would say that nothing is to be done.
    if "INPUT" not in {t.name for t in workflow.rerun_triggers} and rank not in WARNED:
        WARNED.add(rank)
        logger.warning(
            f"esmshard: rank {rank} must be redone (it failed, or its shard or store rows changed), and "
            f"--rerun-triggers without 'input' keeps snakemake from retrying it: add 'input' to --rerun-triggers"
        )


PROGRESS = []  # the watcher, once the run starts


def stop_progress():
    for watcher in PROGRESS:
        watcher.stop()


def hold_results_lock():
    """The results folder is this run's until it ends: another run that reaches it (through a
    symbolic link, say) stops here, before any job, naming this one."""
    try:
        hold_results(sibling(rules.aggregate.output.manifest))
    except EsmShardError as error:
        raise WorkflowError(f"esmshard: {error}") from None


def watch_progress():
    """Overall progress of the ranks on the terminal, as they report it (progress.Watcher)."""
    return Watcher(
        sibling(rules.aggregate.output.manifest, "progress"),
        config["progress_seconds"],
        lambda overall: logger.info(f"esmshard: {overall.line()}"),
    ).start()


onstart:
    hold_results_lock()
    PROGRESS.append(watch_progress())


onsuccess:
    stop_progress()
    cancel_snakemake_timers()


def report_failures(snakemake_log):
    """Each job that failed for good, with its log's first error line: the run's last words."""
    path = snakemake_log[0] if isinstance(snakemake_log, list) else snakemake_log
    try:
        output = Path(path).read_text(errors="replace")
    except OSError:
        return
    for line in failed_jobs(output):
        logger.error(f"esmshard: {line}")


onerror:
    stop_progress()
    report_failures(log)
    cancel_snakemake_timers()
