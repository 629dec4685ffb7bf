"""What an ESM C user would run instead of esmshard: EvolutionaryScale's own ``esm`` package, its
ESMC model batched on one GPU, writing each protein's mean of the final embeddings to HDF5.

    PYTHONPATH=<EvolutionaryScale's esm> python bench/esmc_script.py proteins.fasta esmc.pth means.h5 --budget 16384

The ESM C peer of bench/whole_run.py, timed as a whole process. The model as
``ESMC.from_pretrained`` builds it (heads of 64, EvolutionaryScale's tokenizer, SDPA attention:
flash-attn has no wheels to install) from a state dict in EvolutionaryScale's layout, in
bfloat16 on a GPU (as ``from_pretrained`` puts it there) and run under bfloat16 autocast (as its
``logits`` runs it); proteins sorted by length (longest first) and batched by a padded-token
budget, tokenised batch by batch with the model's own ``_tokenize`` (BOS, residues, EOS, padded),
the mean of ``embeddings`` (after the final LayerNorm) over the residues; truncated at 2048
residues (ESM C's training context, the most EvolutionaryScale's own API takes), as esmshard's
default (long_sequences: truncate) does for ESM C, so that the two compare. The
HDF5 file is laid out as bench/hf_script.py's (``ids``, ``mean``, the script's timings as
attributes). ``--device cpu`` runs it in float32, for a test of the bench without a GPU.
"""

import time

STARTED = time.perf_counter()

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from esm.models.esmc import ESMC  # noqa: E402
from esm.tokenization import get_esmc_model_tokenizers  # noqa: E402

from hf_script import batches, peer_parser, read_fasta, write_means  # noqa: E402

# ESM C was trained on 2048 residues; EvolutionaryScale's own API takes no more (esmshard cuts there too)
MAX_RESIDUES = 2048


def load(checkpoint: Path, device: str) -> ESMC:
    """ESMC of the state dict's shape, as from_pretrained builds and places it."""
    state = {k: v for k, v in torch.load(checkpoint, map_location="cpu").items() if not k.startswith("esmshard_")}
    width = state["embed.weight"].shape[1]
    layers = 1 + max(int(name.split(".")[2]) for name in state if name.startswith("transformer.blocks."))
    with torch.device(device):
        model = ESMC(d_model=width, n_heads=width // 64, n_layers=layers, tokenizer=get_esmc_model_tokenizers())
    model = model.eval()
    # esmshard's random-weight files (bench/whole_run.py's) hold no sequence head: the logits'
    # layers, which no embedding goes through
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.startswith("sequence_head.") for name in missing), (missing, unexpected)
    return model.to(torch.bfloat16) if device != "cpu" else model


def main() -> None:
    parser = peer_parser(__doc__.split("\n\n")[0], "ESM C's state dict (EvolutionaryScale's .pth layout)")
    args = parser.parse_args()
    imported = time.perf_counter() - STARTED
    model = load(args.model, args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loaded = time.perf_counter() - STARTED
    ids, sequences = read_fasta(args.fasta)
    means = np.zeros((len(sequences), model.embed.weight.shape[1]), np.float32)
    tokenising, count = 0.0, 0
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda"))
    with torch.inference_mode(), autocast:
        for batch in batches([len(s) for s in sequences], args.budget, 2, MAX_RESIDUES):
            started = time.perf_counter()
            tokens = model._tokenize([sequences[i][:MAX_RESIDUES] for i in batch])  # [B, L]: BOS residues EOS pad
            tokenising += time.perf_counter() - started
            embeddings = model(sequence_tokens=tokens).embeddings  # [B, L, D]
            lengths = torch.tensor([min(len(sequences[i]), MAX_RESIDUES) for i in batch], device=tokens.device)
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            residues = ((positions >= 1) & (positions <= lengths[:, None])).to(torch.float32)  # [B, L]
            with torch.autocast("cuda", enabled=False):  # the mean summed in float32, not autocast's bfloat16
                summed = torch.einsum("btd,bt->bd", embeddings.float(), residues)
            means[batch] = (summed / lengths[:, None]).cpu().numpy()
            count += int(lengths.sum())
    looped = time.perf_counter() - STARTED
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_means(
        args.output, ids, means, (imported, loaded, looped), tokenising, count, args.budget, dtype, "sdpa", args.device
    )


if __name__ == "__main__":
    main()
