"""The released ESM-2 models: names and shapes (no torch needed to read this)."""

from typing import NamedTuple


class Architecture(NamedTuple):
    layers: int
    embed_dim: int
    heads: int


ESM2_MODELS = {
    "esm2_t6_8M_UR50D": Architecture(6, 320, 20),
    "esm2_t12_35M_UR50D": Architecture(12, 480, 20),
    "esm2_t30_150M_UR50D": Architecture(30, 640, 20),
    "esm2_t33_650M_UR50D": Architecture(33, 1280, 20),
    "esm2_t36_3B_UR50D": Architecture(36, 2560, 40),
    "esm2_t48_15B_UR50D": Architecture(48, 5120, 40),
}

# ESM-2 was trained on at most 1022 residues plus the BOS and EOS tokens.
MAX_RESIDUES = 1022
