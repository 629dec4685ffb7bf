"""The whole workflow on the GPU: bench/gpu_workflow_check.py on a few hundred generated proteins
with the shape of ESM-2 8M (every output, windows), which runs snakemake and compares every
vector with fair-esm's float32 forward on the same GPU, exiting non-zero when a check fails."""

import subprocess
import sys

import pytest

from conftest import REPO, random_sequences, write_fasta


def test_gpu_workflow_check_passes(cuda, tmp_path):
    pytest.importorskip("snakemake")
    fasta = write_fasta(tmp_path / "proteins.fasta", random_sequences(300, seed=11, median=200, cap=1500))
    command = [
        sys.executable,
        str(REPO / "bench/gpu_workflow_check.py"),
        "--like",
        "esm2_t6_8M_UR50D",
        "--all-outputs",
        "--fasta",
        str(fasta),
        "--workdir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASS" in result.stdout
