"""esmshard.embed on the GPU, with the precision a rank would choose there, against fair-esm's
float32 forward on the same device: every pooling, two layers, windowed proteins."""

import copy

import numpy as np

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
    spec = OutputSpec.resolve([3, -1], POOLINGS, network.num_layers, long_sequences="window")
    reference = fair_esm_outputs(copy.deepcopy(network).to(device).float(), alphabet, spec, residues, device)
    precision = compute_precision(RankSettings.from_config({}), device)
    for name in spec.names:
        got = np.concatenate(result[name]) if name.startswith("per_residue") else result[name]
        assert_rows_close(got, rows_of(reference[name], range(len(residues)), name), precision, name)
