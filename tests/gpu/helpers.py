"""What the GPU tests compare with: fair-esm's own forward, and the tolerances."""

import numpy as np
import torch

from conftest import AMINO
from esmshard.outputs import dataset_name

COSINE_MIN = 0.9999  # per vector, every precision
REL_L2_MAX = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-4}  # per vector: |got - want| / |want|


def random_residues(lengths, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.frombuffer("".join(rng.choice(list(AMINO), size=n)).encode(), np.uint8) for n in lengths]


def lognormal_lengths(n: int, seed: int = 0, median: int = 150, cap: int = 1400) -> list[int]:
    """Protein-like lengths: log-normal, some over 1022 (windowed or truncated)."""
    lengths = np.random.default_rng(seed).lognormal(np.log(median), 0.8, n).astype(int)
    return np.clip(lengths, 1, cap).tolist()


@torch.no_grad()
def fair_esm_outputs(network, alphabet, spec, residues, device) -> dict[str, list[np.ndarray]]:
    """{dataset name: one array per sequence} from fair-esm's own forward (``network``, on
    ``device``, in its own dtype), one piece at a time: pooled outputs [dim], per-residue
    [embedded length, dim]. A long protein means what outputs.py says: each of its windows is
    its own pass, a residue's vector is the average over the windows that cover it, the mean is
    over the whole protein and BOS the average of the windows' BOS vectors."""
    converter = alphabet.get_batch_converter()
    out = {name: [] for name in spec.names}
    for r in residues:
        sequence = r.tobytes().decode()
        rows = int(spec.embedded_lengths([len(sequence)])[0])
        total = {layer: np.zeros((rows, network.embed_tokens.embedding_dim)) for layer in spec.layers}
        bos = {layer: [] for layer in spec.layers}
        coverage = np.zeros(rows)
        for start, end in spec.windows(len(sequence)):
            _, _, tokens = converter([("x", sequence[start:end])])  # <cls> residues <eos>
            representations = network(tokens.to(device), repr_layers=list(spec.layers))["representations"]
            for layer in spec.layers:
                hidden = representations[layer][0].double().cpu().numpy()
                total[layer][start:end] += hidden[1 : end - start + 1]
                bos[layer].append(hidden[0])
            coverage[start:end] += 1
        for layer in spec.layers:
            per_residue = total[layer] / coverage[:, None]
            mean, bos_mean = per_residue.mean(0), np.mean(bos[layer], axis=0)
            pooled = {"mean": mean, "bos": bos_mean, "per_residue": per_residue}
            for pooling in spec.poolings:
                out[dataset_name(pooling, layer)].append(pooled[pooling])
    return out


def rows_of(per_sequence: list[np.ndarray], order, name: str) -> np.ndarray:
    """The rows an engine returns for sequences ``order``: pooled [n, dim] or per-residue [rows, dim]."""
    arrays = [per_sequence[i] for i in order]
    return np.concatenate(arrays) if name.startswith("per_residue") else np.stack(arrays)


def assert_rows_close(got, want, precision: str, what: str = "") -> None:
    """Every row (vector) of ``got`` against ``want``: cosine >= COSINE_MIN and relative L2 <=
    REL_L2_MAX[precision]."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    norm = np.linalg.norm(want, axis=1)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * norm)
    rel_l2 = np.linalg.norm(got - want, axis=1) / norm
    worst = int(np.argmax(np.nan_to_num(rel_l2, nan=np.inf)))
    found = (
        f"{what}: {len(got)} rows, cosine min {cosine.min():.7f} (>= {COSINE_MIN}), relative L2 max "
        f"{rel_l2.max():.2e} (<= {REL_L2_MAX[precision]:.0e}, {precision}) at row {worst}"
    )
    print(found)  # the margins, with pytest -rP
    assert cosine.min() >= COSINE_MIN and rel_l2.max() <= REL_L2_MAX[precision], found
