"""The project's own hygiene: lint, formatting, and one set of pinned versions."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, SNAKEFILE

BIN = Path(sys.executable).parent


def test_snakemake_lint_is_clean(tmp_path):
    shutil.copytree(REPO / "demo", tmp_path / "demo")  # the default config's input, read while parsing
    result = subprocess.run(
        [BIN / "snakemake", "--snakefile", SNAKEFILE, "--directory", tmp_path, "--configfile",
         REPO / "config/config.yaml", "--lint"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_formatting(tmp_path):
    result = subprocess.run([BIN / "snakefmt", "--check", REPO / "workflow"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_conda_and_pip_pin_the_same_versions():
    pip = dict(
        re.match(r"([\w-]+)==([\w.]+)", line).groups()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    conda = {}
    for dep in yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]:
        for entry in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, _, version = re.split(r"(==|=)", entry) if "=" in entry else (entry, "", "")
            conda[name] = version
    assert {name: conda.get(name) for name in pip} == pip


def test_the_demo_command_runs_and_says_where_the_embeddings_are(tmp_path):
    for part in ("workflow", "config", "demo"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "environment.yml", tmp_path)  # the rules' conda: environment
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", "demo/run.sh"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Embeddings: results/embeddings.h5 \(10 sequences x \d+ dims", result.stdout)
    if "RANDOM" in result.stdout:  # no network: the stand-in model must say what it is
        assert "The embeddings are NOT meaningful" in result.stdout


def test_parsing_the_workflow_needs_none_of_the_compute_packages(tmp_path):
    """Lint and a dry run with h5py, torch, fair-esm and matplotlib unimportable, as in an
    environment that holds Snakemake alone (numpy stays: the SLURM plugin brings it via pandas)."""
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    runner = ("import sys\nfor name in ('h5py', 'torch', 'esm', 'matplotlib'): sys.modules[name] = None\n"
              "from snakemake.cli import main\nsys.argv = ['snakemake'] + sys.argv[1:]\nmain()\n")
    common = ["--snakefile", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile",
              str(REPO / "config/config.yaml"), "--config", "model=esm2_t6_8M_UR50D"]
    for mode in (["--lint"], ["--dry-run", "--cores", "1"]):
        result = subprocess.run([sys.executable, "-c", runner, *common, *mode], capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
