"""Every `snakemake` command the README shows is accepted as written (a dry run, in a directory
holding the files the command names), so the README cannot drift from the workflow."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SLURM_PLUGINS, SNAKEFILE, random_sequences, write_fasta

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return sorted({line for line in lines if line.startswith("snakemake ") and "--report" not in line})


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_is_accepted(command, tmp_path, tiny_checkpoint):
    (tmp_path / "orfs").mkdir()
    write_fasta(tmp_path / "orfs/a.faa.gz.txt", random_sequences(3))
    (tmp_path / "orfs/a.faa.gz.txt").rename(tmp_path / "orfs/a.faa.gz")  # plain text: read by content
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text(f"fasta: [orfs/a.faa.gz]\nmodel: {tiny_checkpoint}\n")
    argv = shlex.split(command)
    argv = [str(BIN / "snakemake"), "--snakefile", str(SNAKEFILE), "--dry-run", *argv[1:]]
    if "--profile" in argv:  # the profile's directory, as in a checkout
        at = argv.index("--profile") + 1
        argv[at] = str(REPO / argv[at])
    result = subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        # with the SLURM plugin, as a SLURM user installs it (requirements-slurm.txt)
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(SLURM_PLUGINS),
        },
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"^embed\s+\d+$", result.stdout + result.stderr, re.M)


@pytest.mark.parametrize(
    "values, messages",
    [  # values in their YAML types; the schema's errors all in one line (durations: test_resume.py)
        (
            ["pooling=[max]", "world_size=0"],
            [r"'max' is not one of \['mean', 'bos', 'per_residue'\]", r"0 is less than"],
        ),
        (["layers=[-1,99]"], [r"layer 99 is outside this model's layers 0..2"]),  # needs the model: the plan's check
    ],
)
def test_bad_command_line_values_are_named(values, messages, tmp_path, tiny_checkpoint):
    write_fasta(tmp_path / "p.fasta", random_sequences(3))
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text(f"fasta: [p.fasta]\nmodel: {tiny_checkpoint}\n")
    argv = [
        str(BIN / "snakemake"),
        "plan",
        "--snakefile",
        str(SNAKEFILE),
        "--cores",
        "1",
        "--directory",
        str(tmp_path),
        "--config",
        *values,
    ]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        # with the SLURM plugin, as a SLURM user installs it (requirements-slurm.txt)
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": str(SLURM_PLUGINS),
        },
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0 and all(re.search(m, output) for m in messages), result.stderr[-3000:]
    assert not (tmp_path / "results/status").exists()
