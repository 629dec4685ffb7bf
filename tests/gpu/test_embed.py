"""esmshard.embed on the GPU, with the precision a rank would choose there, against fair-esm's
float32 forward on the same device: every pooling, two layers, windowed proteins; and the
`esmshard embed` command, which leases the GPU as a rank does."""

import copy
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from esmshard import embed
from esmshard.model import load_model, write_random_checkpoint
from esmshard.outputs import POOLINGS, OutputSpec
from esmshard.work import RankSettings, compute_precision

from .helpers import assert_rows_close, fair_esm_outputs, lognormal_lengths, random_residues, rows_of


def test_embed_equals_fair_esm_in_the_default_precision(device, tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / "esm2_t6_random.pt", 6, 320, 20, seed=4)
    network, alphabet = load_model(str(checkpoint))
    residues = random_residues([1, 2, 1022, 3000] + lognormal_lengths(36, seed=5), seed=6)
    result = embed(
        [r.tobytes().decode() for r in residues],
        model=checkpoint,
        layers=[3, -1],
        pooling=POOLINGS,
        long_sequences="window",
        device=device,
    )
    spec = OutputSpec.resolve([3, -1], POOLINGS, network.num_layers, long_sequences="window", max_residues=1022)
    reference = fair_esm_outputs(copy.deepcopy(network).to(device).float(), alphabet, spec, residues, device)
    precision = compute_precision(RankSettings.from_config({}), device)
    for name in spec.names:
        got = np.concatenate(result[name]) if name.startswith("per_residue") else result[name]
        assert_rows_close(got, rows_of(reference[name], range(len(residues)), name), precision, name)


def test_the_embed_command_leases_a_gpu_and_writes_what_embed_computes(cuda, tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / "esm2_t6_random.pt", 6, 320, 20, seed=4)
    residues = random_residues(lognormal_lengths(200, seed=7), seed=8)
    sequences = {f"p{i}": r.tobytes().decode() for i, r in enumerate(residues)}
    (tmp_path / "p.fasta").write_text("".join(f">{k}\n{v}\n" for k, v in sequences.items()))
    command = [sys.executable, "-m", "esmshard", "embed", tmp_path / "p.fasta", "-o", tmp_path / "e.h5"]
    command += ["-m", checkpoint, "--set", f"gpu_lock_dir={tmp_path / 'locks'}"]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"on {torch.cuda.get_device_name()}, packed engine in float16" in run.stderr
    assert list((tmp_path / "locks").iterdir())  # the lease's lock file
    expected = embed(sequences, model=checkpoint, device=cuda)["mean/layer_6"]
    with h5py.File(tmp_path / "e.h5") as h5:
        assert h5["ids"].asstr()[:].tolist() == list(sequences) and h5.attrs["compute_precision"] == "float16"
        assert_rows_close(h5["mean/layer_6"][:], expected, "float16", "mean/layer_6")
    assert Path(f"{tmp_path / 'e.h5'}.esmshard/results/store").is_dir()
