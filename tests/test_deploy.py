"""Deploying esmshard as Snakemake users do: `snakedeploy deploy-workflow` from a git repository,
and Snakemake run from an environment that holds Snakemake alone (as `--sdm conda` users and the
workflow catalog's linter do)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import pytest
from packaging.requirements import Requirement

from conftest import REPO, SLURM_PLUGINS, SNAKEFILE, THREADS, random_sequences, write_fasta

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

BIN = Path(sys.executable).parent
SNAKEDEPLOY = Path(sys.prefix) / "snakedeploy/bin/snakedeploy"  # make setup's environment of its own (Makefile)
if not SNAKEDEPLOY.exists():  # a conda environment holds it beside snakemake
    SNAKEDEPLOY = BIN / "snakedeploy"
SLIM = ("snakemake", "snakemake-executor-plugin-slurm", "snakefmt")  # what a slim environment holds
COMPUTE = ("torch", "h5py", "esm", "matplotlib")  # what only the rules' environment has
PIP = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
SLIM_ENV = {"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}  # nothing of this environment on the paths


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """This repository as a git repository elsewhere: its files (committed or new, not ignored)."""
    remote = tmp_path_factory.mktemp("remote") / "esmshard"
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, remote / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for command in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "esmshard"]):
        subprocess.run([*git, *command], cwd=remote, check=True)
    return remote


@pytest.fixture(scope="module")
def deployed(repository, tmp_path_factory) -> Path:
    """`snakedeploy deploy-workflow` of the repository (offline, snakedeploy takes a local path;
    its --branch is then ignored), into a new folder."""
    dest = tmp_path_factory.mktemp("deployed")
    result = subprocess.run(
        [SNAKEDEPLOY, "deploy-workflow", repository, dest, "--branch", "main"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    snakefile = dest / "workflow/Snakefile"
    text = snakefile.read_text()
    # snakedeploy 0.17.1 writes a local repository's Snakefile relative to the repository, which
    # Snakemake reads relative to the deployed Snakefile: point it at the repository (relative,
    # as the linter wants), as the README says.
    assert re.search(r'module esmshard:\s+snakefile:\s+"workflow/Snakefile"', text), text
    module = os.path.relpath(repository / "workflow/Snakefile", snakefile.parent)
    snakefile.write_text(text.replace('"workflow/Snakefile"', f'"{module}"'))
    return dest


def test_snakedeploy_deploys_config_profiles_and_license(deployed):
    assert (deployed / "config/config.yaml").read_text() == (REPO / "config/config.yaml").read_text()
    assert (deployed / "config/README.md").exists() and (deployed / "LICENSE").exists()
    assert {p.name for p in (deployed / "profiles").iterdir() if p.is_dir()} == {"local", "slurm"}
    assert "use rule * from esmshard" in (deployed / "workflow/Snakefile").read_text()


def test_the_deployed_workflow_lints_and_runs(deployed, repository, tiny_checkpoint):
    write_fasta(deployed / "proteins.fasta", random_sequences(20, seed=2, median=60, cap=200))
    config = ["--config", "fasta=[proteins.fasta]", f"model={tiny_checkpoint}", "world_size=2"]
    config.append(f"threads_per_rank={THREADS}")
    # This environment has esmshard installed from the development checkout: the rule scripts must
    # still run the deployed repository's own package.
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HOME": str(deployed)}
    lint = subprocess.run([BIN / "snakemake", "--lint", *config], cwd=deployed, capture_output=True, text=True, env=env)
    assert "Congratulations, your workflow is in a good condition!" in lint.stdout + lint.stderr, lint.stdout
    run = subprocess.run(
        [BIN / "snakemake", "--cores", "2", *config], cwd=deployed, capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (deployed / "results/embeddings.h5").exists() and (deployed / "results/shards/shard_1.h5").exists()
    for log in ("index", "plan", "embed/rank_0", "aggregate"):
        ran = (deployed / f"logs/{log}.log").read_text()
        assert f"esmshard from {(repository / 'workflow/scripts/esmshard').resolve()}\n" in ran, (log, ran[:300])


def distributions_for(names) -> list[metadata.Distribution]:
    """The installed distributions ``names`` and everything they require, as installed here
    (the SLURM plugin where make setup puts it)."""
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        dist = next(iter(metadata.distributions(name=name, path=[*sys.path, str(SLURM_PLUGINS)])), None)
        if dist is None:
            raise metadata.PackageNotFoundError(name)
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found[key] = dist
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


def linked_venv(venv: Path, names) -> Path:
    """A virtual environment holding only the distributions ``names`` and what they require, made
    offline in about a second: the tested installations linked in, not downloaded. Returns its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    for dist in distributions_for(names):
        here = Path(dist.locate_file(""))
        for top in {Path(str(file)).parts[0] for file in dist.files or [] if not str(file).startswith("..")}:
            if (here / top).exists() and not (site / top).exists():
                (site / top).symlink_to(here / top)
    return venv / "bin/python"


@pytest.fixture(scope="module")
def slim_python(tmp_path_factory) -> Path:
    """An environment holding only Snakemake, its SLURM plugin and snakefmt."""
    return linked_venv(tmp_path_factory.mktemp("slim") / "venv", SLIM)


@pytest.fixture(scope="module")
def wheel(repository, tmp_path_factory) -> Path:
    """esmshard's wheel, built from the repository."""
    wheels = tmp_path_factory.mktemp("wheels")
    built = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, repository], capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [path] = wheels.glob("*.whl")
    return path


def install(wheel: Path, python: Path) -> Path:
    """``wheel`` installed (not editable) into ``python``'s environment; returns its site-packages."""
    venv = python.parents[1]
    site = Path(sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv}))
    installed = subprocess.run([*PIP, "install", "--no-deps", "--target", site, wheel])
    assert installed.returncode == 0
    return site


def test_the_slim_environment_lacks_the_compute_packages(slim_python):
    for module in (*COMPUTE, "esmshard"):
        imported = subprocess.run([slim_python, "-c", f"import {module}"], capture_output=True, env=SLIM_ENV)
        assert imported.returncode != 0, module


def test_lint_format_check_and_dry_runs_need_snakemake_alone(slim_python, tmp_path):
    write_fasta(tmp_path / "proteins.fasta", random_sequences(5, seed=1))
    common = [
        "--snakefile",
        SNAKEFILE,
        "--directory",
        tmp_path,
        "--configfile",
        REPO / "config/config.yaml",
        "--config",
        f"fasta=[{tmp_path / 'proteins.fasta'}]",
        "model=esm2_t6_8M_UR50D",
    ]
    env = {**SLIM_ENV, "HOME": str(tmp_path)}
    for args in (["--lint"], ["--dry-run", "--cores", "1"], ["--dry-run", "--profile", REPO / "profiles/slurm"]):
        result = subprocess.run(
            [slim_python, "-m", "snakemake", *common, *args], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, (args, (result.stdout + result.stderr)[-3000:])
        if args == ["--lint"]:
            assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr
        else:
            assert re.search(r"^embed\s+1$", result.stdout + result.stderr, re.M), result.stdout
    formatted = subprocess.run(
        [slim_python, "-m", "snakefmt", "--check", REPO / "workflow"], capture_output=True, text=True, env=env
    )
    assert formatted.returncode == 0, formatted.stderr


def test_a_wheel_carries_the_workflow_and_its_command_runs_it(wheel, tmp_path, tiny_checkpoint):
    """`pip install` of a built wheel (no checkout, not editable): `python -m esmshard run` runs
    the workflow the wheel carries, and every job imports the installed package."""
    python = tmp_path / "venv/bin/python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", python.parents[1]], check=True)
    site = install(wheel, python)
    # the dependencies from this environment (a path entry: its editable esmshard is not loaded)
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    fasta = write_fasta(tmp_path / "p.fasta", random_sequences(8, seed=3, median=60, cap=200))
    command = [python, "-m", "esmshard", "run", fasta, "-o", tmp_path / "out", "-m", tiny_checkpoint]
    run = subprocess.run([*command, "--world-size", "1"], capture_output=True, text=True, env=SLIM_ENV, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout == f"wrote {tmp_path / 'out/results/embeddings.h5'}\n", run.stderr[-3000:]
    for log in ("index", "embed/rank_0", "aggregate"):
        assert f"esmshard from {site / 'esmshard'}\n" in (tmp_path / f"out/logs/{log}.log").read_text()


def test_the_base_install_embeds_without_snakemake_and_the_workflow_needs_the_extra(wheel, tmp_path, tiny_checkpoint):
    """`pip install esmshard` (the wheel's requirements without extras): esmshard.embed() computes
    the vectors this environment does, `esmshard embed` writes a FASTA file's embeddings, and
    `esmshard run` says which extra it needs, in one line."""
    requires = [Requirement(line) for line in metadata.Distribution.at(wheel_metadata(wheel, tmp_path)).requires]
    base = [r.name for r in requires if r.marker is None]
    assert "snakemake" not in base and {"snakemake", "matplotlib"} <= {r.name for r in requires if r.marker}
    python = linked_venv(tmp_path / "venv", base)
    install(wheel, python)
    for module in ("snakemake", "matplotlib"):
        assert subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=SLIM_ENV).returncode
    sequences = {"a": "MKTAYIAKQRQISFVKSHFSRQ", "b": "MSIQHFRVALIPFFAAFCLPVFA"}
    script = (
        "import sys, numpy as np, esmshard; "
        f"r = esmshard.embed({sequences!r}, model={str(tiny_checkpoint)!r}, pooling=['mean']); "
        "np.save(sys.argv[1], r['mean/layer_2'])"
    )
    embedded = subprocess.run(
        [python, "-c", script, tmp_path / "mean.npy"], capture_output=True, text=True, env=SLIM_ENV
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    import esmshard

    expected = esmshard.embed(sequences, model=str(tiny_checkpoint), pooling=["mean"])["mean/layer_2"]
    np.testing.assert_array_equal(np.load(tmp_path / "mean.npy"), expected)
    fasta = write_fasta(tmp_path / "p.fasta", sequences)
    command = [python, "-m", "esmshard", "embed", fasta, "-o", tmp_path / "e.h5", "-m", tiny_checkpoint]
    run = subprocess.run(command, capture_output=True, text=True, env=SLIM_ENV, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith(f"wrote {tmp_path / 'e.h5'}: 2 proteins"), run.stderr[-3000:]
    with h5py.File(tmp_path / "e.h5") as h5:
        np.testing.assert_allclose(h5["mean/layer_2"][:], expected, rtol=0, atol=1e-6)
    command = [python, "-m", "esmshard", "run", fasta, "-o", tmp_path / "out", "-m", tiny_checkpoint]
    run = subprocess.run(command, capture_output=True, text=True, env=SLIM_ENV, cwd=tmp_path)
    assert run.returncode == 1 and run.stdout == "", run
    assert run.stderr.count("\n") == 1 and "pip install 'esmshard[workflow]'" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def wheel_metadata(wheel: Path, into: Path) -> Path:
    """The wheel's .dist-info directory, unpacked into ``into``."""
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.split("/")[0].endswith(".dist-info")]
        archive.extractall(into / "metadata", names)
    return into / "metadata" / names[0].split("/")[0]
