"""esmshard used as a Snakemake module, the way workflows are deployed: two prefixed instances
with different models in one host workflow give two correct, separate results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import SNAKEFILE, config_for, fair_esm_mean, random_sequences, read_embeddings, write_fasta
from esmshard.model import load_model, write_random_checkpoint

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


def run_host(workdir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", "2"]
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
