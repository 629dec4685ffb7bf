"""ESM C against EvolutionaryScale's own ``esm`` package: its ESMC module (random weights of a
small shape, its tokenizer, its forward) in an environment of its own, since its top-level
module ``esm`` is also fair-esm's; its state dict then read by esmshard, through both engines and
the workflow."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import esm
import h5py
import numpy as np
import pytest

from conftest import AMINO, completed_run, config_for, read_embeddings, write_fasta
from esmshard import embed
from esmshard.architectures import MAX_RESIDUES, checkpoint_identity, resolve_model

pytestmark = pytest.mark.workflow  # installs the reference package and runs the real snakemake: not in make test-fast

# EvolutionaryScale's package and what importing its ESMC module needs beyond this environment,
# pinned; installed without their dependencies (torch, transformers, numpy come from here).
REFERENCE = (
    "esm==3.2.1.post1",
    "einops==0.8.2",
    "zstd==1.5.7.2",
    "cloudpathlib==0.26.0",
    "scipy==1.17.1",
    "biotite==1.6.0",
    "brotli==1.2.1",
    "msgpack==1.2.4",
    "msgpack-numpy==0.4.8",
    "biopython==1.88",
    "httpx==0.29.0",
    "pandas==3.1.2",
)
LAYERS, WIDTH, HEADS = 3, 128, 2  # heads of 64, as ESM C's
# 1500: over ESM-2's limit, embedded whole; 2100: over ESM C's 2048, truncated there
LENGTHS = (300, 1, 2, 50, 1500, 2100, 77)
MAX = MAX_RESIDUES["esmc"]

REFERENCE_SCRIPT = """
import sys
import numpy as np
import torch
from esm.models.esmc import ESMC
from esm.tokenization import EsmSequenceTokenizer

out, layers, width, heads, sequences = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5:]
torch.manual_seed(7)
model = ESMC(d_model=width, n_heads=heads, n_layers=layers, tokenizer=EsmSequenceTokenizer(), use_flash_attn=False)
model = model.eval()
with torch.no_grad():
    for tensor in model.parameters():
        if tensor.dim() == 1:  # LayerNorms (and the head's biases): non-trivial
            tensor.add_(0.1 * torch.randn_like(tensor))
torch.save(model.state_dict(), f"{out}/esmc.pth")
arrays = {}
with torch.no_grad():
    for i, sequence in enumerate(sequences):
        tokens = model._tokenize([sequence])
        output = model(sequence_tokens=tokens)
        arrays[f"tokens_{i}"] = tokens[0].numpy()
        arrays[f"hidden_{i}"] = output.hidden_states[:, 0].numpy()  # [layers, L, D], each block's output
        arrays[f"last_{i}"] = output.embeddings[0].numpy()  # [L, D], after the final LayerNorm
np.savez(f"{out}/reference.npz", **arrays)
"""


@pytest.fixture(scope="session")
def reference_site() -> Path:
    """EvolutionaryScale's esm and what its ESMC needs, in a folder kept between sessions."""
    key = hashlib.sha256(" ".join(REFERENCE).encode()).hexdigest()[:12]
    site = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "esmshard-tests" / f"esmc-{key}"
    if not (site / ".complete").exists():
        installed = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
            + ["--ignore-requires-python", "--upgrade", "--target", site, *REFERENCE],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if installed.returncode != 0:
            message = f"EvolutionaryScale's esm could not be installed: {installed.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(message)  # never skipped silently in CI
            pytest.skip(message)
        (site / ".complete").touch()
    return site


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(13)
    return {f"p{i}": "".join(rng.choice(list(AMINO), size=n)) for i, n in enumerate(LENGTHS)}


@pytest.fixture(scope="module")
def reference(reference_site, sequences, tmp_path_factory):
    """(EvolutionaryScale's state dict, as released models' .pth; its outputs for the sequences)."""
    out = tmp_path_factory.mktemp("esmc")
    cut = [sequence[:MAX] for sequence in sequences.values()]  # as EvolutionaryScale's API takes them
    command = [sys.executable, "-c", REFERENCE_SCRIPT, out, LAYERS, WIDTH, HEADS, *cut]
    ran = subprocess.run(
        list(map(str, command)),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(reference_site)},  # its esm before fair-esm's
        cwd=out,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    return out / "esmc.pth", dict(np.load(out / "reference.npz"))


def expected(arrays: dict, i: int, layer: int) -> np.ndarray:
    """EvolutionaryScale's hidden states [L, D] of sequence i at esmshard's ``layer``."""
    return arrays[f"last_{i}"] if layer == LAYERS else arrays[f"hidden_{i}"][layer - 1]


def test_the_tokens_are_esmshards(reference, sequences):
    _, arrays = reference
    alphabet = esm.Alphabet.from_architecture("ESM-1b")  # the token ids the packer writes
    for i, sequence in enumerate(sequences.values()):
        ids = [alphabet.cls_idx, *alphabet.encode(sequence[:MAX]), alphabet.eos_idx]
        assert arrays[f"tokens_{i}"].tolist() == ids


@pytest.mark.parametrize("engine", ["reference", "packed"])
def test_every_output_equals_evolutionaryscales_esmc(reference, sequences, engine):
    state_dict, arrays = reference
    result = embed(
        sequences,
        model=state_dict,
        layers=[1, 2, -1],
        pooling=["mean", "bos", "per_residue"],
        engine=engine,
        device="cpu",
    )
    for layer in (1, 2, 3):
        for i, sequence in enumerate(sequences.values()):
            hidden = expected(arrays, i, layer)
            residues = hidden[1 : min(len(sequence), MAX) + 1]
            got = {
                "mean": result[f"mean/layer_{layer}"][i],
                "bos": result[f"bos/layer_{layer}"][i],
                "per_residue": result[f"per_residue/layer_{layer}"][i],
            }
            want = {"mean": residues.mean(0), "bos": hidden[0], "per_residue": residues}
            for name in got:
                assert np.abs(got[name] - want[name]).max() <= 1e-5, (engine, layer, name, len(sequence))


def test_the_workflow_embeds_esmc_on_two_ranks_and_records_its_family(reference, sequences, tmp_path):
    state_dict, arrays = reference
    identity = checkpoint_identity(resolve_model(str(state_dict)))
    assert (identity["family"], identity["num_layers"], identity["embed_dim"]) == ("esmc", LAYERS, WIDTH)
    fasta = write_fasta(tmp_path / "p.fasta", sequences)
    workdir = completed_run(tmp_path, config_for(fasta, state_dict, world_size=2, model_type="esmc"))
    ids, vectors, attrs = read_embeddings(workdir / "results/embeddings.h5", f"mean/layer_{LAYERS}")
    assert ids == list(sequences) and attrs["model_family"] == "esmc"
    for i, (vector, sequence) in enumerate(zip(vectors, sequences.values())):
        want = expected(arrays, i, LAYERS)[1 : min(len(sequence), MAX) + 1].mean(0)
        assert np.abs(vector - want).max() <= 1e-5
    with h5py.File(workdir / "results/embeddings.h5") as h5:  # only the one over 2048 is cut
        assert (
            h5["truncated"][:].tolist() == [len(s) > MAX for s in sequences.values()] and attrs["max_residues"] == MAX
        )
    with h5py.File(workdir / "results/shards/shard_1.h5") as shard:
        assert shard.attrs["model_family"] == "esmc"
    assert f"(ESM C, {LAYERS} layers, dim {WIDTH})" in (workdir / "logs/embed/rank_0.log").read_text()
    assert json.loads((workdir / "results/manifest.json").read_text())["model_family"] == "esmc"


def test_a_released_name_is_its_hub_repository_in_the_cache_as_evolutionaryscales_package_keeps_it(
    reference, sequences, tmp_path, monkeypatch
):
    """esmc_300m is EvolutionaryScale/esmc-300m-2024-12, found offline in the Hugging Face cache
    where EvolutionaryScale's from_pretrained downloads it (data/weights/esmc_300m_2024_12_v0.pth)."""
    state_dict, arrays = reference
    repo = tmp_path / "hub/models--EvolutionaryScale--esmc-300m-2024-12"
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    weights = repo / "snapshots" / revision / "data/weights/esmc_300m_2024_12_v0.pth"
    weights.parent.mkdir(parents=True)
    weights.symlink_to(state_dict)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("esmc_300m", "EvolutionaryScale/esmc-300m-2024-12"):
        assert resolve_model(name).location == weights
    one = dict(list(sequences.items())[3:4])
    result = embed(one, model="esmc_300m", layers=[1], model_type="esmc", device="cpu")
    want = expected(arrays, 3, 1)[1 : len(one["p3"]) + 1].mean(0)
    assert np.abs(result["mean/layer_1"][0] - want).max() <= 1e-5
