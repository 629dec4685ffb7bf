"""The project's own hygiene: lint, formatting, and one set of pinned versions."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SNAKEFILE, THREADS, random_sequences, read_embeddings, write_fasta

BIN = Path(sys.executable).parent


def test_snakemake_lint_is_clean(tmp_path):
    shutil.copytree(REPO / "demo", tmp_path / "demo")  # the default config's input, read while parsing
    result = subprocess.run(
        [
            BIN / "snakemake",
            "--snakefile",
            SNAKEFILE,
            "--directory",
            tmp_path,
            "--configfile",
            REPO / "config/config.yaml",
            "--lint",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_snakefmt_formatting(tmp_path):
    result = subprocess.run([BIN / "snakefmt", "--check", REPO / "workflow"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def conda_pins(path: Path) -> dict[str, str]:
    """Package -> pinned version of a conda environment file (its pip section included)."""
    pins = {}
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        for entry in dep["pip"] if isinstance(dep, dict) else [dep]:
            name, _, version = re.split(r"(==|=)", entry) if "=" in entry else (entry, "", "")
            pins[name] = version
    return pins


def test_pip_conda_and_the_rules_environment_pin_the_same_versions():
    pip = dict(
        re.match(r"([\w-]+)==([\w.]+)", line).groups()
        for name in ("requirements.txt", "requirements-slurm.txt")
        for line in (REPO / name).read_text().splitlines()
        if line and not line.startswith("#")
    )
    development, runtime = conda_pins(REPO / "environment.yml"), conda_pins(REPO / "workflow/envs/esmshard.yaml")
    assert {name: development.get(name) for name in pip} == pip
    packages = set(runtime) - {"python", "pip"}
    assert {name: pip.get(name) for name in packages} == {name: runtime[name] for name in packages}
    assert runtime["python"] == development["python"]
    assert not {"snakemake", "pytest", "snakefmt", "snakedeploy", "selenium"} & packages  # runtime only
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = lambda requirements: {re.match(r"[\w-]+", r)[0].lower().replace("_", "-") for r in requirements}
    extras = project["optional-dependencies"]
    base, workflow = names(project["dependencies"]), names(extras["workflow"])
    assert base | workflow == {name.replace("_", "-") for name in packages} | {"snakemake"}
    assert names(extras["slurm"]) == {"esmshard", "snakemake-executor-plugin-slurm"}
    assert not base & {"snakemake", "matplotlib"}  # esmshard.embed() needs neither
    rule_envs = set(
        re.findall(
            r"conda:\s*\n\s*(\S+)", "".join(path.read_text() for path in (REPO / "workflow/rules").glob("*.smk"))
        )
    )
    assert rule_envs == {'"../envs/esmshard.yaml"'}


@pytest.mark.workflow
def test_the_demo_command_runs_and_says_where_the_embeddings_are(tmp_path):
    for part in ("workflow", "config", "demo"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", "demo/run.sh"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"Embeddings: results/embeddings.h5 \(10 sequences x \d+ dims", result.stdout)
    if "RANDOM" in result.stdout:  # no network: the stand-in model must say what it is
        assert "The embeddings are NOT meaningful" in result.stdout
    # the printed way to continue uses the demo's own settings: nothing left to do
    assert "Again, or its report: snakemake --cores 2 --configfile demo/config.yaml" in result.stdout
    again = subprocess.run(
        ["snakemake", "--cores", "2", "--configfile", "demo/config.yaml", "-n"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-3000:]


@pytest.mark.workflow
def test_the_run_command_runs_the_workflow_and_its_exit_status_says_what_came_of_it(tmp_path, tiny_checkpoint):
    records = random_sequences(20, seed=6, median=60, cap=300)
    fasta, out = write_fasta(tmp_path / "p.fasta", records), tmp_path / "out"
    command = [BIN / "esmshard", "run", fasta, "-o", out, "-m", tiny_checkpoint, "--world-size", "2"]
    command += ["--set", "layers=[1, 2]", "--set", f"threads_per_rank={THREADS}"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    partial = subprocess.run(command, capture_output=True, text=True, env={**env, "ESMSHARD_FAIL_RANKS": "1"})
    assert partial.returncode == 2, partial.stderr
    assert f"without the proteins of rank(s) 1 (listed in {out / 'results/missing_ids.txt'}); the same command" in (
        partial.stderr
    )
    assert "progress: " in partial.stderr
    complete = subprocess.run(command, capture_output=True, text=True, env={**env, "ESMSHARD_FAIL_RANKS": ""})
    assert complete.returncode == 0 and complete.stdout == f"wrote {out / 'results/embeddings.h5'}\n", complete.stderr
    ids, _, attrs = read_embeddings(out / "results/embeddings.h5", "mean/layer_1")
    assert ids == list(records) and list(attrs["layers"]) == [1, 2]
    unknown = subprocess.run([*command, "--set", "no_such_option=1"], capture_output=True, text=True, env=env)
    assert (
        unknown.returncode == 1
        and unknown.stderr.startswith("esmshard run: error: ")
        and "no_such_option" in (unknown.stderr)
    )
    assert len(unknown.stderr.splitlines()) == 1


def test_config_readme_lists_every_option_as_the_schema_says():
    from esmshard.settings import options_table, schema

    readme = (REPO / "config/README.md").read_text()
    assert options_table() in readme, "config/README.md is stale: python -m esmshard options prints its table"
    for option in schema()["properties"]:
        assert f"| `{option}` |" in readme, option


def test_package_txt_lists_every_file_a_module_from_git_copies():
    """workflow/package.txt: what rules/package.smk copies for a module deployed from git."""
    listed = [line for line in (REPO / "workflow/package.txt").read_text().splitlines() if not line.startswith("#")]
    workflow = REPO / "workflow"
    present = [*workflow.glob("scripts/esmshard/*.py"), *workflow.glob("schemas/*")]
    assert sorted(listed) == sorted(str(path.relative_to(workflow)) for path in present)


def test_the_version_has_one_source_and_the_command_says_it():
    """esmshard.__version__ is what pip installed (pyproject.toml reads it) and what `esmshard
    --version` prints (the console command `make setup` installs)."""
    from importlib import metadata

    import esmshard

    assert metadata.version("esmshard") == esmshard.__version__
    result = subprocess.run([BIN / "esmshard", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == f"esmshard {esmshard.__version__}\n", result.stderr


def test_citation_and_catalog_files_say_what_is_true():
    """CITATION.cff carries the one version and cites ESM-2; the catalog's usage caps no GPU."""
    import esmshard

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert citation["version"] == esmshard.__version__
    assert any(ref.get("doi") == "10.1126/science.ade2574" for ref in citation["references"])  # ESM-2
    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    assert "gpu=" not in catalog["usage"]["mandatory-flags"]["flags"]
