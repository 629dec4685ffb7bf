"""The reference engine: fair-esm's own forward pass, mean-pooled like its extract.py."""

import numpy as np
import torch

from esmshard.architectures import MAX_RESIDUES

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_layer(layer: int, num_layers: int) -> int:
    """A layer number in 0..num_layers; negative numbers count from the end (-1: last)."""
    resolved = num_layers + 1 + layer if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"layer {layer} is outside this model's layers 0..{num_layers} (or -1..-{num_layers + 1})")
    return resolved


class ReferenceEngine:
    """Embeds padded batches with fair-esm's ESM2.forward; returns one mean vector per sequence.

    The mean runs over residue positions of the chosen layer, without BOS, EOS and padding: the
    vector ``scripts/extract.py --include mean`` writes. Sequences are cut at 1022 residues.
    """

    def __init__(self, network, alphabet, device: str, precision: str, layer: int):
        self.device = torch.device(device)
        self.dtype = PRECISIONS[precision]
        if self.device.type == "cpu" and self.dtype != torch.float32:
            raise ValueError("on the CPU the reference engine runs in float32 only")
        self.network = network.to(device=self.device, dtype=self.dtype).eval()
        self.layer = resolve_layer(layer, network.num_layers)
        self.batch_converter = alphabet.get_batch_converter(truncation_seq_length=MAX_RESIDUES)
        self.dim = network.embed_dim

    @torch.inference_mode()
    def embed(self, sequences: list[str]) -> np.ndarray:
        """[len(sequences), dim] float32 mean embeddings."""
        _, _, tokens = self.batch_converter([(str(i), s) for i, s in enumerate(sequences)])
        tokens = tokens.to(self.device, non_blocking=True)
        out = self.network(tokens, repr_layers=[self.layer])["representations"][self.layer]
        lengths = torch.tensor([min(len(s), MAX_RESIDUES) for s in sequences], device=self.device)
        positions = torch.arange(out.shape[1], device=self.device)
        residue_mask = (positions[None, :] >= 1) & (positions[None, :] <= lengths[:, None])  # [B, T]
        summed = (out.float() * residue_mask[:, :, None]).sum(dim=1)  # [B, dim]
        return (summed / lengths[:, None]).cpu().numpy()
