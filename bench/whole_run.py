"""The whole run a user makes, against the scripts they would write instead, side by side.

    python bench/whole_run.py --like esm2_t33_650M_UR50D --n 12000 --real ../shared/data/P62593.fasta
    python bench/whole_run.py --like esm1b_t33_650M_UR50S --n 6000 --real ../shared/data/P62593.fasta
    python bench/whole_run.py --like prot_t5_xl --n 3000 --real ../shared/data/P62593.fasta --budgets 16384
    python bench/whole_run.py --like esmc_600m --n 60000 --esm-site ESM_SITE --budgets 131072 262144

Input: the first --real-n records of --real (real proteins) and synthetic ones (log-normal
lengths, median 300, uncapped: some exceed 1022, the limit of ESM-2 and ESM-1b, and are truncated
there by all) up to --n, written
once into --cache with a model of the named shape (RANDOM weights, float16 as the released
files): a fair-esm checkpoint for ESM-2, ESM-1b/ESM-1v and ESM C (EvolutionaryScale's state
dict), a Hugging Face T5 directory with ProtT5's tokenizer for prot_t5_xl (ProtT5-XL's encoder,
Rostlab/prot_t5_xl_half_uniref50-enc's shape); for the transformers peer of ESM-2 and ESM-1b the
same weights once more as transformers' EsmModel directory (``write_hf_esm``). Then, timed as
whole processes from start to exit, the peers that apply to the family:
  - fair-esm (ESM-2, ESM-1b): bench/fair_esm_script.py, a plain fp16 fair-esm script;
  - transformers (ESM-2, ESM-1b, ProtT5): bench/hf_script.py, EsmModel with SDPA or
    T5EncoderModel in float16 (on a GPU also with ``model.half()``, as Rostlab's README), length-
    sorted batches of a padded-token budget, once per --budgets value (each printed; the fastest
    is the peer's figure);
  - esm (ESM C): bench/esmc_script.py, EvolutionaryScale's own ESMC in bfloat16, batched the
    same way, once per --budgets value, with that package from --esm-site first on its path;
each writing the means to HDF5, and
  - esmshard cold: `snakemake --cores C --resources gpu=1 results/embeddings.h5` in a fresh
    directory, with empty torch.compile caches (the page cache is not dropped: the files were
    just written); --with-report runs the default target instead (the report too, which needs
    matplotlib);
  - esmshard warm: the same again in another fresh directory, caches as the cold run left them.
Peers that cannot run there (FAESM, esm-efficient) get a row saying why. Each --variant (a YAML
mapping of options) adds one more warm run with those options, and its time over the warm
run's (e.g. per-residue output against the mean alone, in one call). Prints one table (seconds,
time to the output file, each peer's time over esmshard's cold and warm runs, each peer's
numerics against esmshard's warm means), each transformers run's own breakdown, and each
esmshard run's stages from the job logs (Snakemake's start, index, plan, rank start-up to its
first batch, embedding, aggregate, report). Checks esmshard's means against every peer's
(cosine >= 0.999: float16 approximations of the same forward) and exits non-zero when one
differs or when every run of a peer failed. --device cpu runs it all on the CPU (the peers in
float32), to test the bench without a GPU on a small shape (--like esm2_t6_8M_UR50D, or any
--like with --shape 2,64,4).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from engine_speed import SHAPES, family_of, synthetic_records  # noqa: E402
from esmshard.architectures import FAMILIES  # noqa: E402
from esmshard.outputs import OutputSpec  # noqa: E402

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ", re.M)
PROCESS_AGE = re.compile(r"job process started ([\d.]+) s ago")  # esmshard.logs.setup's second line

# The peers that run each family's models, and the padded-token budgets the transformers peer tries.
PEERS = {
    "esm2": ("fair-esm", "transformers"),
    "esm1b": ("fair-esm", "transformers"),
    "esmc": ("esm",),
    "prott5": ("transformers",),
}
BUDGETS = (16384, 65536, 131072)  # the peers were fastest at 131,072-262,144 on an H100 (docs/benchmarks.md)
MIN_COSINE = 0.999
# Peers that are not installable on the GPU machines (Python 3.12, torch 2.11, no network; wheels
# carried in at most 64 MiB), by family, with why (checked 2026-12-07).
UNAVAILABLE = {
    "esm2": {
        "FAESM 0.1.1 (SDPA fallback)": "its pure wheel imports names that transformers' modeling_esm no "
        "longer has (fails on 5.24 and 4.57.6; runs, SDPA, on 4.49.0), so it needs a transformers 4.49 + "
        "tokenizers 0.21 + huggingface_hub 0.36 stack of its own (13.2 MiB of wheels) beside the 47 MiB "
        "this bench carries: over the carry's limit; its flash-attn path has no wheels on PyPI (sdist "
        "only, a CUDA build) and the GPU machine has no network",
        "esm-efficient 0.0.9": "imports flash_attn unconditionally (no wheels on PyPI, no network to build it)",
    },
    "esmc": {
        "FAESM 0.1.1 (ESM C)": "needs EvolutionaryScale's esm package, whose module name esm is fair-esm's; "
        "and the transformers 4.49 stack above",
    },
}


def write_input(path: Path, n: int, real: Path | None, real_n: int, seed: int = 0) -> None:
    """The first ``real_n`` records of ``real``, then synthetic ones (uncapped lengths) up to ``n``."""
    records = (
        [r.removeprefix(b">").rstrip(b"\n") for r in real.read_bytes().split(b"\n>")[: min(real_n, n)]] if real else []
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.writelines(b">" + record + b"\n" for record in records)
        out.writelines(synthetic_records(n - len(records), 300, seed, cap=None))
    tmp.rename(path)


def timed(command: list[str], env: dict, log: Path) -> float:
    started = time.time()
    with open(log, "w") as handle:
        result = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed, see {log}:\n{log.read_text()[-3000:]}")
    return started


def stages(workdir: Path, started: float) -> dict:
    """Seconds from the run's start to each job's process start (None where its log does not say)
    and its log's first and last line, and the rank's own figures."""
    out = {}
    for log in sorted((workdir / "logs").rglob("*.log")):
        text = log.read_text()
        stamps = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f").timestamp() - started for s in STAMP.findall(text)]
        if stamps:
            age = PROCESS_AGE.search(text)
            process_start = round(stamps[0] - float(age.group(1)), 3) if age else None
            out[log.stem] = (process_start, round(stamps[0], 3), round(stamps[-1], 3))  # the logs' resolution
    rank_log = (workdir / "logs/embed/rank_0.log").read_text()
    for key, pattern in (
        ("first batch after process start", r"first batch done, ([\d.]+) s after"),
        ("model loaded in", r"loaded in ([\d.]+) s"),
        ("rank's peak host memory (GiB)", r"peak host memory ([\d.]+) GiB"),
        ("rank's peak GPU memory (GiB)", r"peak GPU memory ([\d.]+) GiB"),
    ):
        found = re.search(pattern, rank_log)
        out[key] = float(found.group(1)) if found else None
    return out


def run_esmshard(workdir: Path, fasta: Path, checkpoint: Path, caches: Path, extra: dict, targets=()) -> dict:
    workdir.mkdir(parents=True)
    config = {"fasta": [str(fasta)], "model": str(checkpoint), "world_size": 1, **extra}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
    }
    command = [
        "snakemake",
        *targets,  # before --resources, which takes every word after it
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        str(os.cpu_count()),
        "--resources",
        "gpu=1",
    ]
    started = timed(command, env, workdir / "snakemake.out")
    ended = time.time()
    return {
        "seconds": ended - started,
        "to_embeddings": (workdir / "results/embeddings.h5").stat().st_mtime - started,
        "stages": stages(workdir, started),
    }


def write_model(path: Path, shape: tuple[int, int, int], family: str, device: str) -> Path:
    """A model of ``shape`` (layers, width, heads) with random weights at ``path`` (written once:
    under another name, then renamed), as write_random_checkpoint lays its family out; a ProtT5
    directory gets ProtT5's tokenizer too (``add_prott5_tokenizer``)."""
    if path.exists():
        return path
    import torch

    from esmshard.model import write_random_checkpoint

    layers, dim, heads = shape
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    write_random_checkpoint(tmp, layers, dim, heads, seed=0, dtype=torch.float16, device=device, family=family)
    if family == "prott5":
        add_prott5_tokenizer(tmp)
    tmp.rename(path)
    return path


def add_prott5_tokenizer(directory: Path) -> None:
    """ProtT5's tokenizer (its pieces <pad>, </s>, <unk>, then one per residue letter, in ProtT5's
    token ids; 100 extra ids, as its 128 tokens) as transformers' T5Tokenizer saves it."""
    import transformers

    from esmshard.huggingface import PROTT5_RESIDUES

    pieces = ["<pad>", "</s>", "<unk>", *(f"\u2581{letter}" for letter in PROTT5_RESIDUES)]
    transformers.T5Tokenizer(vocab=[(piece, -1.0) for piece in pieces], extra_ids=100).save_pretrained(directory)


def write_hf_esm(checkpoint: Path, directory: Path) -> Path:
    """The fair-esm ``checkpoint``'s weights, in float16, as transformers' EsmModel directory
    (config.json, model.safetensors, the EsmTokenizer's vocab.txt; written once, under another
    name, then renamed): the same model, for the transformers peer. Each of EsmModel's tensors is
    named back by esmshard's own rules for reading such a directory (model._HF_NAMES) and taken
    from the module esmshard's loader makes of the checkpoint; every encoder weight must be used."""
    if directory.exists():
        return directory
    import torch
    import transformers
    from safetensors.torch import save_file

    from esmshard.architectures import checkpoint_architecture
    from esmshard.model import _HF_NAMES, _HF_NOT_WEIGHTS, load_model

    family, shape = checkpoint_architecture(checkpoint)
    network, alphabet = load_model(str(checkpoint))
    state = network.state_dict()
    config = transformers.EsmConfig(
        vocab_size=len(alphabet.all_toks),
        pad_token_id=alphabet.padding_idx,
        mask_token_id=alphabet.mask_idx,
        hidden_size=shape.embed_dim,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        intermediate_size=4 * shape.embed_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
        position_embedding_type="rotary" if family == "esm2" else "absolute",
        token_dropout=True,
        emb_layer_norm_before=family == "esm1b",
        layer_norm_eps=1e-5,
        architectures=["EsmModel"],
    )
    with torch.device("meta"):
        names = list(transformers.EsmModel(config, add_pooling_layer=False).state_dict())
    weights, used = {}, set()
    for name in names:
        if _HF_NOT_WEIGHTS.search(name):
            continue
        source = name
        for pattern, replacement in _HF_NAMES:
            source = pattern.sub(replacement, source)
        if source not in state:
            raise SystemExit(f"write_hf_esm: EsmModel's {name} (fair-esm's {source}) is not in {checkpoint}")
        weights[name] = state[source].to(torch.float16).contiguous()
        used.add(source)
    unused = [n for n in state if n not in used and not n.startswith("lm_head.") and not n.endswith("inv_freq")]
    if unused:
        raise SystemExit(f"write_hf_esm: {checkpoint}'s {unused[:5]} have no place in EsmModel")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "vocab.txt").write_text("\n".join(alphabet.all_toks) + "\n")
    transformers.EsmTokenizer(str(tmp / "vocab.txt")).save_pretrained(tmp)
    tmp.rename(directory)
    return directory


def run_peer(command: list[str], output: Path, log: Path, env: dict | None = None) -> dict:
    """One peer's whole process: its seconds, time to its output file and own breakdown, or its failure."""
    started = time.time()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    ended = time.time()
    if result.returncode:
        tail = "\n".join(log.read_text().splitlines()[-4:])
        return {"failed": f"exit status {result.returncode}, see {log}: ...{tail[-600:]}"}
    row = {"seconds": ended - started, "to_embeddings": output.stat().st_mtime - started, "output": str(output)}
    with h5py.File(output) as h5:
        row["breakdown"] = {key: value.item() if hasattr(value, "item") else value for key, value in h5.attrs.items()}
    return row


def numerics(esmshard_h5: Path, peer_h5: Path, layer: int) -> dict:
    """esmshard's means against a peer's, protein by protein (by ID; a peer's ID is its header's
    first word): cosine and relative L2 distance."""
    with h5py.File(esmshard_h5) as ours, h5py.File(peer_h5) as theirs:
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ours["ids"][:]]
        got = ours[f"mean/layer_{layer}"][:].astype(np.float64)
        peer_ids = [(i.decode() if isinstance(i, bytes) else str(i)).split()[0] for i in theirs["ids"][:]]
        want = theirs["mean"][:].astype(np.float64)
    if peer_ids != ids:
        row = {peer_id: i for i, peer_id in enumerate(peer_ids)}
        want = want[[row[i] for i in ids]]
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    rel_l2 = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    cosine = np.where(np.isfinite(cosine), cosine, -1.0)  # a NaN or infinite mean disagrees
    return {
        "proteins": len(ids),
        "cosine_min": float(cosine.min()),
        "cosine_median": float(np.median(cosine)),
        "rel_l2_median": float(np.nanmedian(rel_l2)),
        "rel_l2_max": float(np.nanmax(rel_l2)),
        "not_finite": int((~np.isfinite(want)).any(1).sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--like", default="esm2_t33_650M_UR50D", choices=sorted(SHAPES))
    parser.add_argument("--n", type=int, default=12000)
    parser.add_argument("--real", type=Path, default=None)
    parser.add_argument("--real-n", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/esmshard-whole-run"))
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="esmshard option for both runs (YAML value), e.g. pooling=[mean,per_residue]",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=yaml.safe_load,
        metavar="YAML",
        help="options of one more warm run, compared with the warm run in the same call, "
        "e.g. --variant '{pooling: [mean, per_residue], dtype: float16}'; repeat for more",
    )
    parser.add_argument("--no-baseline", action="store_true", help="no peers: esmshard's runs alone")
    parser.add_argument(
        "--peers", nargs="+", default=["fair-esm", "transformers", "esm"], help="of those that apply to the family"
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS), help="the transformers and esm peers'")
    parser.add_argument(
        "--esm-site",
        type=Path,
        default=None,
        help="a folder holding EvolutionaryScale's esm package and what its ESMC imports (the esm peer of ESM C)",
    )
    parser.add_argument("--with-report", action="store_true", help="esmshard's default target (the report too)")
    parser.add_argument("--device", default="cuda", help="cpu: everything on the CPU, peers in float32 (a test)")
    parser.add_argument(
        "--shape",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="LAYERS,WIDTH,HEADS instead of --like's (its family's layout), e.g. 2,64,4 for a test on the CPU",
    )
    args = parser.parse_args()
    extra = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.config)}
    if not all(isinstance(variant, dict) for variant in args.variant):
        parser.error("--variant takes a YAML mapping, e.g. '{dtype: float16}'")

    args.cache.mkdir(parents=True, exist_ok=True)
    family = family_of(args.like)
    shape = args.shape or SHAPES[args.like]
    layers = shape[0]
    store = args.cache / f"shape_{'x'.join(map(str, shape))}" if args.shape else args.cache
    store.mkdir(exist_ok=True)
    fasta = args.cache / f"proteins_{args.n}{f'_{args.real.stem}_{args.real_n}' if args.real else ''}.fasta"
    if not fasta.exists():
        write_input(fasta, args.n, args.real, args.real_n)
    import torch

    draw_on = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    # fair-esm's loader wants a released name's stem; ProtT5 is a Hugging Face directory
    model = write_model(store / (args.like if family == "prott5" else f"{args.like}.pt"), shape, family, draw_on)
    if draw_on == "cuda":
        torch.cuda.empty_cache()  # this process keeps its CUDA context only, not the weights drawn
    peers = [] if args.no_baseline else [peer for peer in args.peers if peer in PEERS.get(family, ())]
    targets = [] if args.with_report else ["results/embeddings.h5"]

    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=args.cache))
    rows, half = {}, "fp32" if args.device == "cpu" else "fp16"

    def done(name: str, row: dict) -> dict:
        """Records a run, and says so at once (the table comes at the end)."""
        rows[name] = row
        said = f"{row['seconds']:.1f} s" if "seconds" in row else row.get("failed", "not installable there")
        print(f"{name}: {said}", flush=True)
        return row

    if "fair-esm" in peers:
        command = [sys.executable, str(REPO / "bench/fair_esm_script.py"), str(fasta), str(model)]
        output = runs / "fair_esm.h5"
        device = [args.device] if args.device != "cuda" else []
        done(f"fair-esm {half} script", run_peer([*command, str(output), *device], output, runs / "fair_esm.out"))
    if "transformers" in peers:
        hf_model = model if family == "prott5" else write_hf_esm(model, store / f"{args.like}-hf")
        kind = "T5EncoderModel" if family == "prott5" else "EsmModel sdpa"
        # ProtT5 twice: as transformers loads it in float16 (wo kept float32), and all float16 as
        # Rostlab's README makes it (model.half(), faster)
        variants = [("", []), (" .half()", ["--half"])] if family == "prott5" and args.device != "cpu" else [("", [])]
        for budget in args.budgets:
            for suffix, flags in variants:
                output = runs / f"transformers{'_half' if flags else ''}_{budget}.h5"
                command = [sys.executable, str(REPO / "bench/hf_script.py"), str(fasta), str(hf_model), str(output)]
                command += ["--budget", str(budget), "--device", args.device, *flags]
                name = f"transformers {kind}{suffix} {half}, budget {budget}"
                done(name, run_peer(command, output, runs / f"{output.stem}.out"))
    if "esm" in peers:  # EvolutionaryScale's esm, whose top-level module is also fair-esm's: first on its path
        if args.esm_site is None:
            parser.error("the esm peer of ESM C needs --esm-site (or --peers without esm)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.esm_site), os.environ.get("PYTHONPATH", "")])}
        for budget in args.budgets:
            output = runs / f"esm_{budget}.h5"
            command = [sys.executable, str(REPO / "bench/esmc_script.py"), str(fasta), str(model), str(output)]
            command += ["--budget", str(budget), "--device", args.device]
            name = f"esm ESMC {'fp32' if args.device == 'cpu' else 'bf16'}, budget {budget}"
            done(name, run_peer(command, output, runs / f"esm_{budget}.out", env))
    if not args.no_baseline:
        for name, why in UNAVAILABLE.get(family, {}).items():
            done(name, {"unavailable": why})
    caches = runs / "compile-caches"
    for name in ("cold", "warm"):
        done(f"esmshard {name}", run_esmshard(runs / name, fasta, model, caches, extra, targets))
    for number, variant in enumerate(args.variant):
        row = run_esmshard(runs / f"variant{number}", fasta, model, caches, {**extra, **variant}, targets)
        row["over warm"] = row["seconds"] / rows["esmshard warm"]["seconds"]
        done(f"esmshard warm, {variant}", row)

    warm_h5 = runs / "warm/results/embeddings.h5"
    with h5py.File(warm_h5) as h5:
        residues = int(OutputSpec.from_attrs(h5.attrs).embedded_lengths(h5["lengths"][:]).sum())
        sequences = len(h5["ids"])
    failures = []
    for name, row in rows.items():
        if "output" in row:
            row["numerics"] = numerics(warm_h5, Path(row["output"]), layers)
            if not row["numerics"]["cosine_min"] >= MIN_COSINE:
                failures.append(f"{name}: cosine min {row['numerics']['cosine_min']:.6f} < {MIN_COSINE}")
    for peer in peers:
        peer_rows = [row for name, row in rows.items() if name.startswith(peer)]
        if peer_rows and all("failed" in row for row in peer_rows):
            failures.append(f"{peer}: every run failed")
    best = {}  # each peer's fastest run
    for name, row in rows.items():
        peer = next((peer for peer in peers if name.startswith(peer)), None)
        if peer and "seconds" in row and row["seconds"] < rows.get(best.get(peer), {}).get("seconds", np.inf):
            best[peer] = name

    print(
        f"\n{args.like}{f' family, shape {shape}' if args.shape else ' shape'} ({FAMILIES[family]}, RANDOM "
        f"weights), {sequences} proteins, {residues} residues "
        f"embedded, mean of layer {layers}, esmshard options {extra or 'default'}, esmshard target "
        f"{' '.join(targets) or 'all (with the report)'}, device {args.device}; runs in {runs}"
    )
    cold, warm = rows["esmshard cold"]["seconds"], rows["esmshard warm"]["seconds"]
    print(
        "| run | whole run (s) | to its output (s) | run / esmshard cold | run / esmshard warm | run / warm run "
        "| means against esmshard warm's |\n|---|---:|---:|---:|---:|---:|---|"
    )
    for name, row in rows.items():
        label = f"{name} (fastest)" if name in best.values() and len(args.budgets) > 1 and "budget" in name else name
        if "unavailable" in row or "failed" in row:
            print(f"| {label} | {'not installable there' if 'unavailable' in row else 'failed'} | | | | | |")
            continue
        peer = "output" in row
        numbers = row.get("numerics")
        agreement = (
            f"cos min {numbers['cosine_min']:.6f}, median {numbers['cosine_median']:.6f}; rel L2 median "
            f"{numbers['rel_l2_median']:.1e}, max {numbers['rel_l2_max']:.1e}"
            + (f"; {numbers['not_finite']} not finite" if numbers["not_finite"] else "")
            if numbers
            else ""
        )
        over_cold = f"{row['seconds'] / cold:.2f}x" if peer else ""
        over_warm = f"{row['seconds'] / warm:.2f}x" if peer else ""
        variant = f"{row['over warm']:.2f}x" if "over warm" in row else ""
        print(
            f"| {label} | {row['seconds']:.1f} | {row['to_embeddings']:.1f} | {over_cold} | {over_warm} "
            f"| {variant} | {agreement} |"
        )
    for name, row in rows.items():
        if "unavailable" in row or "failed" in row:
            print(f"\n{name}: {row.get('unavailable') or row.get('failed')}")
    for name, row in rows.items():
        if "breakdown" in row and row["breakdown"]:
            b = row["breakdown"]
            print(
                f"\n{name}: import {b['import_s']:.1f} s, load {b['load_s']:.1f} s, loop {b['loop_s']:.1f} s "
                f"(tokenising {b['tokenise_s']:.1f} s of it), {b['residues']} residues, attention {b['attention']}, "
                f"peak GPU memory {b['peak_gpu_gib']:.1f} GiB"
            )
    for name, row in rows.items():
        if "stages" in row:
            print(f"\n{name} stages (s from the start: process start, first and last log line):")
            for stage, value in row["stages"].items():
                print(f"  {stage:34s} {value}")
    (runs / "result.json").write_text(json.dumps(rows, indent=2))
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
