"""What a user would run instead of esmshard with Hugging Face transformers: a careful script,
in float16 on one GPU, writing each protein's mean of the last layer to HDF5.

    python bench/hf_script.py proteins.fasta MODEL_DIRECTORY means.h5 --budget 16384

The transformers peer of bench/whole_run.py, timed as a whole process. The model directory's
config.json says which model it is:
  - ESM-2 / ESM-1b (model_type esm): ``EsmModel.from_pretrained(dtype=float16,
    attn_implementation="sdpa")`` without its pooler, the directory's EsmTokenizer (<cls> residues
    <eos>, truncated at 1022 residues as fair-esm's extract.py does), mean over the residues
    (the attention mask without <cls> and <eos>);
  - ProtT5 (model_type t5): ``T5EncoderModel.from_pretrained(dtype=float16)`` as Rostlab's
    prott5_embedder.py runs it: residues separated by spaces, U/Z/O/B as X, the directory's
    tokenizer with its special tokens (residues then </s>), padding to the longest, mean over the
    residues without </s>; whole proteins, as Rostlab's script embeds them (esmshard's ProtT5
    limit, 10,000 residues, is over every protein the bench makes). transformers keeps T5's
    feed-forward output projections (``wo``, its _keep_in_fp32_modules) in float32 when it loads
    T5 in float16: their outputs, which overflow float16 in ProtT5, and so the residual stream
    after the first block, are float32, and T5Block clamps what stays float16 at its largest
    finite value. ``--half``: ``model.half()`` after loading, as Rostlab's README does on a GPU:
    every weight float16, wo too (faster; T5Block's clamps are then all that stands between its
    outputs and infinity).
Both: eval mode, ``torch.inference_mode``, proteins sorted by length (longest first, so that a
budget too large fails at once) and batched by a padded-token budget (``--budget``: a batch's
proteins times its longest protein's tokens), tokenised batch by batch, each batch's means
copied to the host as it ends. The HDF5 file holds ``ids`` (each header's first word, input
order) and ``mean`` [n, D] float32, with the script's own timings as attributes (import, load,
tokenising, the loop, peak GPU memory).
"""

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ESM_MAX_RESIDUES = 1022  # what ESM-2 and ESM-1b were trained on (fair-esm's extract.py truncates there)


def read_fasta(path: Path) -> tuple[list[str], list[str]]:
    """(IDs: each header's first word, sequences), in file order."""
    ids, sequences, lines = [], [], None
    with open(path) as handle:
        for line in handle:
            if line.startswith(">"):
                if lines is not None:
                    sequences.append("".join(lines))
                ids.append(line[1:].split()[0] if line[1:].split() else "")
                lines = []
            elif lines is not None:
                lines.append(line.strip())
    if lines is not None:
        sequences.append("".join(lines))
    return ids, sequences


def batches(lengths: list[int], budget: int, specials: int, max_residues: int | None) -> list[list[int]]:
    """Indices of the proteins, longest first, in batches of at most ``budget`` padded tokens
    (a protein longer than the budget alone), each cut at ``max_residues`` (None: whole)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, batch, longest = [], [], 0
    for i in order:
        tokens = min(lengths[i], max_residues or lengths[i]) + specials
        longest = max(longest, tokens)
        if batch and (len(batch) + 1) * longest > budget:
            out.append(batch)
            batch, longest = [], tokens
        batch.append(i)
    if batch:
        out.append(batch)
    return out


def peer_parser(description: str, model_help: str) -> argparse.ArgumentParser:
    """The arguments of every peer script bench/whole_run.py runs: FASTA, model, output, budget, device."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("fasta", type=Path)
    parser.add_argument("model", type=Path, help=model_help)
    parser.add_argument("output", type=Path)
    parser.add_argument("--budget", type=int, default=16384, help="padded tokens per batch")
    parser.add_argument("--device", default="cuda")
    return parser


def write_means(
    output: Path,
    ids: list[str],
    means: np.ndarray,
    marks: tuple[float, float, float],
    tokenising: float,
    residues: int,
    budget: int,
    dtype: str,
    attention: str,
    device: str,
) -> None:
    """A peer's output as bench/whole_run.py reads it: ``ids``, ``mean`` and its timings as
    attributes (import_s, load_s, tokenise_s, loop_s, residues, attention, peak_gpu_gib, ...).
    ``marks``: seconds since the process started when its imports, its model's load and its loop
    were done."""
    imported, loaded, looped = marks
    timings = {
        "import_s": imported,
        "load_s": loaded - imported,
        "tokenise_s": tokenising,
        "loop_s": looped - loaded,
        "residues": int(residues),
        "budget": budget,
        "dtype": dtype,
        "attention": attention,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(output, "w") as h5:
        h5["ids"] = np.array(ids, dtype=object)
        h5["mean"] = means
        h5.attrs.update(timings)
    print(json.dumps(timings))


def main() -> None:
    parser = peer_parser(__doc__.split("\n\n")[0], "a Hugging Face model directory (ESM-2, ESM-1b or ProtT5)")
    parser.add_argument("--layer", type=int, default=None, help="hidden_states index (default: the last layer)")
    parser.add_argument(
        "--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="default float16 (float32 on CPU)"
    )
    parser.add_argument("--half", action="store_true", help="model.half() after loading (ProtT5, as Rostlab's README)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "float16"))
    imported = time.perf_counter() - STARTED

    model_type = json.loads((args.model / "config.json").read_text())["model_type"]
    t5 = model_type == "t5"
    if t5:
        model = transformers.T5EncoderModel.from_pretrained(args.model, dtype=dtype)
        if args.half:
            model = model.half()
    else:
        model = transformers.EsmModel.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa", add_pooling_layer=False
        )
    model = model.to(args.device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loaded = time.perf_counter() - STARTED

    ids, sequences = read_fasta(args.fasta)
    lengths = [len(s) for s in sequences]
    means = np.zeros((len(sequences), model.config.hidden_size), np.float32)
    tokenising = 0.0
    count = 0
    with torch.inference_mode():
        # whole proteins for ProtT5, as Rostlab's prott5_embedder.py embeds them
        for batch in batches(lengths, args.budget, 1 if t5 else 2, None if t5 else ESM_MAX_RESIDUES):
            started = time.perf_counter()
            if t5:  # Rostlab's tokenising: rare residues as X, residues spaced, then </s>
                texts = [" ".join(re.sub(r"[UZOB]", "X", sequences[i])) for i in batch]
                encoded = tokenizer(texts, add_special_tokens=True, padding="longest", return_tensors="pt")
            else:
                texts = [sequences[i] for i in batch]
                encoded = tokenizer(
                    texts, padding="longest", truncation=True, max_length=ESM_MAX_RESIDUES + 2, return_tensors="pt"
                )
            tokenising += time.perf_counter() - started
            input_ids = encoded["input_ids"].to(args.device, non_blocking=True)
            mask = encoded["attention_mask"].to(args.device, non_blocking=True)
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=args.layer is not None)
            hidden = out.last_hidden_state if args.layer is None else out.hidden_states[args.layer]
            residues = mask.clone()  # the residues: without </s> (T5), without <cls> and <eos> (ESM)
            last = mask.sum(1) - 1
            residues[torch.arange(len(batch), device=mask.device), last] = 0
            if not t5:
                residues[:, 0] = 0
            weights = residues.to(torch.float32)
            summed = torch.einsum("btd,bt->bd", hidden.float(), weights)
            means[batch] = (summed / weights.sum(1, keepdim=True)).cpu().numpy()
            count += weights.sum().item()
    looped = time.perf_counter() - STARTED
    write_means(
        args.output,
        ids,
        means,
        (imported, loaded, looped),
        tokenising,
        count,
        args.budget,
        "float16, every weight (model.half())" if args.half else str(dtype).removeprefix("torch."),
        model.config._attn_implementation,
        args.device,
    )


if __name__ == "__main__":
    main()
