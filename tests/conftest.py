import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from esmshard.index import SequenceIndex
from esmshard.model import write_random_checkpoint
from esmshard.outputs import OutputSpec
from esmshard.plan import read_plan

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
# Where make setup installs the SLURM plugin, off the path of every snakemake but test_slurm's
# (requirements-slurm.txt says why); a conda environment holds it in its site-packages instead.
SLURM_PLUGINS = Path(sys.prefix) / "slurm-plugins"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
# One torch thread in each process the tests run (this worker; each rank, through the configs'
# threads_per_rank): make test runs a worker per core, and two OpenMP threads per process on
# shared cores wait at every barrier (the tiny model: 1.3 s on one thread, 52 s on two).
THREADS = 1
torch.set_num_threads(THREADS)


# make test's pytest-xdist (--dist loadfile --no-loadscope-reorder) hands whole files to its
# workers in collection order: the longest go first, so that the suite never ends waiting on one
# of them alone.
LONGEST_FILES = ("test_sigkill.py", "test_resume.py", "test_rerun.py", "test_workflow.py")
# The SLURM test mostly waits for SLURM's job states (~2 minutes, ~20 s of CPU): it gets a worker
# of its own beside one per core (WaitingFileScheduling), instead of idling one of them.
WAITING_FILE = "tests/test_slurm.py"


def pytest_collection_modifyitems(items):
    position = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: position.get(item.path.name, len(position)))


EXTRA_WORKER = pytest.StashKey[bool]()


@pytest.hookimpl(optionalhook=True, wrapper=True)
def pytest_xdist_auto_num_workers(config):
    cores = yield
    config.stash[EXTRA_WORKER] = config.getoption("dist") == "loadfile"
    return cores + config.stash[EXTRA_WORKER]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if not config.stash.get(EXTRA_WORKER, False):
        return None
    from xdist.scheduler import LoadFileScheduling

    class WaitingFileScheduling(LoadFileScheduling):
        """loadfile, except that the first worker runs WAITING_FILE alone, or nothing where that
        file is not selected: the others are one per core."""

        waiting_node = None

        def _assign_work_unit(self, node):
            if self.waiting_node is None and len(self.nodes) > 1:
                self.waiting_node = node
                if WAITING_FILE in self.workqueue:
                    self.workqueue.move_to_end(WAITING_FILE, last=False)
                    super()._assign_work_unit(node)
                node.shutdown()  # no more work: a worker holds back its last test until told
            else:
                super()._assign_work_unit(node)

        def _reschedule(self, node):
            if node is not self.waiting_node:
                super()._reschedule(node)

    return WaitingFileScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def identity_cache(tmp_path_factory):
    """Checkpoint identities (esmshard.architectures.identity_cache) go to the test session's own
    cache, which the snakemake commands it starts inherit, not to the user's ~/.cache."""
    os.environ["ESMSHARD_CACHE"] = str(tmp_path_factory.mktemp("esmshard-cache"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A real ESM-2 architecture (2 layers, width 32) with random weights, in fair-esm's format."""
    return write_random_checkpoint(tmp_path_factory.mktemp("model") / "esm2_tiny.pt", 2, 32, 4, seed=1)


def random_sequences(n: int, seed: int = 0, median: int = 120, cap: int = 1400) -> dict[str, str]:
    """Protein-like sequences with log-normal lengths (not all equal, some over 1022)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.7, n).astype(int), 1, cap)
    return {f"seq{i:05d}": "".join(rng.choice(list(AMINO), size=length)) for i, length in enumerate(lengths)}


def write_fasta(path: Path, records: dict[str, str], width: int = 60) -> Path:
    with open(path, "w") as handle:
        for seq_id, seq in records.items():
            handle.write(f">{seq_id} some description\n")
            for i in range(0, len(seq), width):
                handle.write(seq[i : i + width] + "\n")
    return path


def config_for(fasta, model, **extra) -> dict:
    """A workflow config for ``fasta`` (a path or glob) and ``model``, with quick progress lines."""
    return {"fasta": [str(fasta)], "model": str(model), "progress_seconds": 0.5, "threads_per_rank": THREADS, **extra}


# What most tests run: the embeddings, not the report's figures (rule all), which cost every run a
# matplotlib process; the tests of the default target pass targets=().
EMBEDDINGS = ("results/embeddings.h5",)


def snakemake_command(
    workdir: Path, config: dict, *args: str, env: dict | None = None, cores: int = 2, targets=EMBEDDINGS
):
    """(command, environment) of the real snakemake command for ``targets`` on the workflow in
    ``workdir``, on the CPU, with ``config`` written there."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    command = [
        str(Path(sys.executable).with_name("snakemake")),
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(cores),
        *targets,  # before the options, some of which take any number of values
        *args,
    ]
    return command, {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ESMSHARD_FAIL_RANKS": "", **(env or {})}


def run_snakemake(workdir: Path, config: dict, *args: str, env: dict | None = None, cores: int = 2, targets=EMBEDDINGS):
    """Run snakemake to its end; returns CompletedProcess."""
    command, full_env = snakemake_command(workdir, config, *args, env=env, cores=cores, targets=targets)
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=600)


def completed_run(workdir: Path, config: dict, *args: str, env: dict | None = None, targets=EMBEDDINGS) -> Path:
    """A snakemake run that must succeed; returns its directory."""
    result = run_snakemake(workdir, config, *args, env=env, targets=targets)
    assert result.returncode == 0, result.stderr
    return workdir


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints: which rules ran, how many jobs each."""
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def assert_same_embeddings(workdir: Path, other: Path, atol: float = 0.0) -> int:
    """Both runs' embeddings.h5 hold the same IDs in the same order and the same vectors
    (bit for bit when atol is 0); returns the number of rows compared."""
    ids, embeddings, _ = read_embeddings(workdir / "results/embeddings.h5")
    other_ids, other_embeddings, _ = read_embeddings(other / "results/embeddings.h5")
    assert ids == other_ids and len(set(ids)) == len(ids)
    if atol:
        assert np.abs(embeddings - other_embeddings).max() <= atol
    else:
        assert embeddings.tobytes() == other_embeddings.tobytes()
    return len(ids)


def read_embeddings(path: Path, name: str | None = None) -> tuple[list[str], np.ndarray, dict]:
    """IDs, the dataset ``name`` (default: the mean of the only layer) and the attributes."""
    with h5py.File(path, "r") as h5:
        if name is None:
            (layer,) = h5.attrs["layers"]
            name = f"mean/layer_{layer}"
        return list(h5["ids"].asstr()[:]), h5[name][:], dict(h5.attrs)


def planned_ids(workdir: Path, rank: int) -> list[str]:
    """Every ID whose sequence rank ``rank`` embeds (its shard holds the first ID of identical ones)."""
    plan = read_plan(workdir / "results/plan.h5")
    return list(SequenceIndex(workdir / "results/index").ids()[plan.rank[plan.source] == rank])


def fair_esm_outputs(network, alphabet, sequence: str, layer: int) -> dict[str, np.ndarray]:
    """What fair-esm's scripts/extract.py --include mean bos per_tok writes for one sequence, unbatched."""
    _, _, tokens = alphabet.get_batch_converter(truncation_seq_length=1022)([("x", sequence)])
    with torch.no_grad():
        representation = network(tokens, repr_layers=[layer])["representations"][layer][0]
    per_residue = representation[1 : min(len(sequence), 1022) + 1].numpy()
    return {"mean": per_residue.mean(0), "bos": representation[0].numpy(), "per_residue": per_residue}


def fair_esm_mean(network, alphabet, sequence: str, layer: int) -> np.ndarray:
    return fair_esm_outputs(network, alphabet, sequence, layer)["mean"]


def spec_for(network, layers=(-1,), poolings=("mean",), long_sequences="truncate") -> OutputSpec:
    return OutputSpec.resolve(layers, poolings, network.num_layers, long_sequences, max_residues=1022)


def residues_of(sequences: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(s.encode(), np.uint8) for s in sequences]


def split_rows(per_residue: np.ndarray, lengths) -> list[np.ndarray]:
    return np.split(per_residue, np.cumsum(lengths)[:-1])


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of ``size`` (e.g. "9m") mounted at ``path`` (made if need be) while in the block;
    skips the test where it cannot be mounted (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])
