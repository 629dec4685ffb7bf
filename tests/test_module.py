"""esmshard used as a Snakemake module, the way workflows are deployed: two prefixed instances
with different models in one host workflow give two correct, separate results."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SNAKEFILE, config_for, fair_esm_mean, random_sequences, read_embeddings, write_fasta
from esmshard.model import load_model, write_random_checkpoint

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

HOST = """
configfile: "host.yaml"


module esmshard_a:
    snakefile: "{snakefile}"
    config: config["a"]
    prefix: "a"


use rule * from esmshard_a as a_*


module esmshard_b:
    snakefile: "{snakefile}"
    config: config["b"]
    prefix: "b"


use rule * from esmshard_b as b_*


rule all:
    default_target: True
    input:
        "a/results/embeddings.h5",
        "b/results/embeddings.h5",
"""


def run_host(workdir: Path, env: dict | None = None, args=()) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", "2", *args]
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ESMSHARD_FAIL_RANKS": "", **(env or {})}
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=full_env, timeout=600)


def test_two_prefixed_instances_with_two_models_never_mix(tmp_path, tiny_checkpoint):
    records = random_sequences(30, seed=31, median=80)
    write_fasta(tmp_path / "proteins.fasta", records)
    other = write_random_checkpoint(tmp_path / "other.pt", 2, 32, 4, seed=9)
    (tmp_path / "Snakefile").write_text(HOST.format(snakefile=SNAKEFILE))
    host_config = {
        "a": config_for("proteins.fasta", tiny_checkpoint, world_size=2),
        "b": config_for("proteins.fasta", other, world_size=2),
    }
    (tmp_path / "host.yaml").write_text(json.dumps(host_config))

    first = run_host(tmp_path, env={"ESMSHARD_FAIL_RANKS": "1"})  # rank 1 fails in both instances
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_host(tmp_path)  # retries exactly those
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule a_embed" in result.stderr and "rule b_embed" in result.stderr
    for prefix, checkpoint in (("a", tiny_checkpoint), ("b", other)):
        manifest = json.loads((tmp_path / prefix / "results/manifest.json").read_text())
        assert manifest["complete"]
        ids, vectors, attrs = read_embeddings(tmp_path / prefix / "results/embeddings.h5")
        assert ids == list(records) and attrs["model"] == str(Path(checkpoint).resolve())
        network, alphabet = load_model(str(checkpoint))
        expected = np.stack([fair_esm_mean(network, alphabet, records[i], 2) for i in ids])
        assert np.abs(vectors - expected).max() <= 1e-5
        for kind in ("shards", "store", "status"):  # everything the instance writes follows its prefix
            assert (tmp_path / prefix / "results" / kind).is_dir()
        assert (tmp_path / prefix / "logs/embed/rank_0.log").is_file()
    assert not (tmp_path / "results").exists()
    assert "Nothing to be done" in run_host(tmp_path).stderr


GIT_HOST = """
configfile: "host.yaml"


module esmshard:
    snakefile: gitfile("../esmshard", path="workflow/Snakefile", tag="v9.9.9")
    config: config["esmshard"]


use rule * from esmshard as esmshard_*


rule all:
    default_target: True
    input:
        "results/embeddings.h5",
"""


def test_a_module_from_a_tagged_git_repository_runs_that_tags_package(tmp_path, tiny_checkpoint):
    """What snakedeploy writes (github(..., tag=...)), offline: gitfile() on a tagged repository
    takes the same code path. The host directory holds no project file; every job imports the
    package copied from the tag (the editable install in this environment points elsewhere)."""
    repo, host = tmp_path / "esmshard", tmp_path / "host"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "release"], ["tag", "v9.9.9"]):
        subprocess.run([*git, *command], cwd=repo, check=True)
    host.mkdir()
    records = random_sequences(24, seed=41, median=90)
    write_fasta(host / "proteins.fasta", records)
    (host / "host.yaml").write_text(
        json.dumps({"esmshard": config_for("proteins.fasta", tiny_checkpoint, world_size=2)})
    )
    (host / "Snakefile").write_text(GIT_HOST)

    for check in ("--lint", "--dry-run"):
        result = run_host(host, args=[check])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    result = run_host(host)
    assert result.returncode == 0, result.stderr[-3000:]
    ids, vectors, _ = read_embeddings(host / "results/embeddings.h5")
    network, alphabet = load_model(str(tiny_checkpoint))
    expected = np.stack([fair_esm_mean(network, alphabet, records[i], 2) for i in ids])
    assert ids == list(records) and np.abs(vectors - expected).max() <= 1e-5
    [copy] = (host / ".snakemake/esmshard").iterdir()
    for log in ("logs/embed/rank_0.log", "logs/embed/rank_1.log", "logs/aggregate.log"):
        assert f"esmshard from {copy}/scripts/esmshard" in (host / log).read_text(), log
    assert sorted(p.name for p in host.iterdir()) == [
        ".snakemake",
        "Snakefile",
        "host.yaml",
        "logs",
        "proteins.fasta",
        "results",
    ]
