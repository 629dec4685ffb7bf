"""What a user would run instead of esmshard: a plain fair-esm script, as its README and
scripts/extract.py show it, in float16 on one GPU, writing the mean of the last layer to HDF5.

    python bench/fair_esm_script.py proteins.fasta esm2_t33_650M_UR50D.pt means.h5 [DEVICE]

A peer of bench/whole_run.py, timed as a whole process. fair-esm's own loader, with the
unsafe unpickler its checkpoints need on torch >= 2.6 (what users do), extract.py's 4096-token
length-sorted batches, truncation at 1022 residues, ``.half()``. fair-esm's ESM-1b forward in
half precision fails (its token-dropout rescale turns the embeddings float32 before its half
LayerNorm), so ESM-1b runs under float16 autocast too, as a user makes it run. DEVICE
(default cuda) ``cpu`` runs it in float32, for a test of the bench without a GPU.
"""

import sys
from pathlib import Path

import esm
import h5py
import numpy as np
import torch


def main(fasta: str, checkpoint: str, output: str, device: str = "cuda") -> None:
    data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model, alphabet = esm.pretrained.load_model_and_alphabet_core(Path(checkpoint).stem, data, None)
    esm1b = isinstance(model, esm.ProteinBertModel)
    kind = torch.device(device).type
    model = (model.eval().half() if kind != "cpu" else model.eval()).to(device)
    layer = model.num_layers
    dataset = esm.FastaBatchedDataset.from_file(fasta)
    batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches)
    means = {}
    with torch.no_grad(), torch.autocast(kind, torch.float16, enabled=esm1b and kind != "cpu"):
        for labels, strs, toks in loader:
            out = model(toks.to(device, non_blocking=True), repr_layers=[layer])["representations"][layer]
            for i, label in enumerate(labels):
                means[label] = out[i, 1 : min(len(strs[i]), 1022) + 1].float().mean(0).cpu().numpy()
    with h5py.File(output, "w") as h5:
        h5["ids"] = np.array(dataset.sequence_labels, dtype=object)
        h5["mean"] = np.stack([means[label] for label in dataset.sequence_labels])


if __name__ == "__main__":
    main(*sys.argv[1:5])
