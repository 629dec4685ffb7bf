"""ProtT5: a T5 encoder directory as transformers saves it, with ProtT5's vocabulary and
tokenizer, against transformers' own T5EncoderModel and T5Tokenizer, through both engines and
the workflow."""

import json
import re
import shutil

import h5py
import numpy as np
import pytest
import torch

from conftest import AMINO, completed_run, config_for, read_embeddings, write_fasta
from esmshard import EsmShardError, embed
from esmshard.architectures import checkpoint_identity, resolve_model

transformers = pytest.importorskip("transformers")  # a test dependency only (requirements.txt)

LENGTHS = (300, 1, 2, 50, 2500, 77)  # 2500: over ESM-2's limit, whole as Rostlab embeds it
# ProtT5's spiece vocabulary: <pad>, </s>, <unk>, then one piece per residue letter
PIECES = ["<pad>", "</s>", "<unk>", *(f"▁{letter}" for letter in "ALGVSREDTIPKFQNYMHWCXBOUZ")]


@pytest.fixture(scope="module")
def prott5_dir(tmp_path_factory):
    """transformers' T5EncoderModel of ProtT5's kind (ReLU feed-forward, relative position
    buckets, vocabulary 128), 2 layers of width 64 with 4 heads of 24 (an inner width of 96: as in
    ProtT5-XL, not the model's width), random weights with perturbed LayerNorms and position
    biases, and its T5Tokenizer over ProtT5's pieces; as save_pretrained writes them."""
    config = transformers.T5Config(
        vocab_size=128,
        d_model=64,
        d_kv=24,
        num_heads=4,
        d_ff=256,
        num_layers=2,
        feed_forward_proj="relu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(9)
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "layer_norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
            if "relative_attention_bias" in name:
                tensor.normal_()
    directory = tmp_path_factory.mktemp("prott5") / "prot_t5_tiny"
    model.save_pretrained(directory)
    tokenizer = transformers.T5Tokenizer(vocab=[(piece, -1.0) for piece in PIECES], extra_ids=0)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(17)
    records = {f"p{i}": "".join(rng.choice(list(AMINO), size=n)) for i, n in enumerate(LENGTHS)}
    records["rare"] = "MKUZOBVLA"  # U, Z, O and B are embedded as X
    return records


@pytest.fixture(scope="module")
def reference(prott5_dir, sequences):
    """transformers' hidden states [L + 1, D] per layer (1 and 2) of each whole sequence,
    tokenised as Rostlab's scripts do (residues spaced, rare ones as X)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(prott5_dir)
    model = transformers.T5EncoderModel.from_pretrained(prott5_dir).eval()
    out = {}
    with torch.no_grad():
        for name, sequence in sequences.items():
            spaced = " ".join(re.sub(r"[UZOB]", "X", sequence))
            ids = tokenizer(spaced, return_tensors="pt")["input_ids"]
            assert ids[0, -1].item() == 1 and ids.shape[1] == len(sequence) + 1  # residues, then </s>
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            out[name] = {layer: hidden[layer][0].numpy() for layer in (1, 2)}
    return out


@pytest.mark.parametrize("engine", ["reference", "packed"])
def test_every_output_equals_transformers_t5_encoder(prott5_dir, sequences, reference, engine):
    result = embed(
        sequences, model=prott5_dir, layers=[1, 2], pooling=["mean", "per_residue"], engine=engine, device="cpu"
    )
    for i, (name, sequence) in enumerate(sequences.items()):
        for layer in (1, 2):
            residues = reference[name][layer][: len(sequence)]  # without </s>
            assert np.abs(result[f"mean/layer_{layer}"][i] - residues.mean(0)).max() <= 1e-5, (engine, name, layer)
            assert np.abs(result[f"per_residue/layer_{layer}"][i] - residues).max() <= 1e-5, (engine, name, layer)


def test_the_family_is_prott5_and_it_has_no_bos(prott5_dir):
    identity = checkpoint_identity(resolve_model(str(prott5_dir)))
    assert (identity["family"], identity["num_layers"], identity["embed_dim"]) == ("prott5", 2, 64)
    with pytest.raises(ValueError, match="pooling: bos, but ProtT5 .* has no BOS token"):
        embed({"a": "MKV"}, model=prott5_dir, pooling=["bos"], device="cpu")
    with pytest.raises(ValueError, match="model_type: 'esm2', but .* holds an ProtT5 model"):
        embed({"a": "MKV"}, model=prott5_dir, model_type="esm2", device="cpu")


def test_a_t5_that_is_not_prott5_is_named(tmp_path, prott5_dir):
    config = json.loads((prott5_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-gelu"}))
    with pytest.raises(EsmShardError, match="is a T5 model that esmshard cannot run as ProtT5: feed_forward_proj"):
        resolve_model(str(tmp_path))
    shutil.copytree(prott5_dir, tmp_path / "other_tokens")
    tokenizer = json.loads((prott5_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab[3], vocab[4] = vocab[4], vocab[3]  # A and L swapped: every A would be embedded as L
    (tmp_path / "other_tokens/tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(EsmShardError, match="tokenizer.json gives the residue A the token id 4, not ProtT5's 3"):
        resolve_model(str(tmp_path / "other_tokens"))


@pytest.mark.workflow
def test_the_workflow_embeds_prott5_on_two_ranks(prott5_dir, sequences, reference, tmp_path):
    fasta = write_fasta(tmp_path / "p.fasta", sequences)
    workdir = completed_run(tmp_path, config_for(fasta, prott5_dir, world_size=2, model_type="prott5"))
    ids, vectors, attrs = read_embeddings(workdir / "results/embeddings.h5", "mean/layer_2")
    assert ids == list(sequences) and attrs["model_family"] == "prott5"
    for vector, (name, sequence) in zip(vectors, sequences.items()):
        assert np.abs(vector - reference[name][2][: len(sequence)].mean(0)).max() <= 1e-5
    with h5py.File(workdir / "results/shards/shard_0.h5") as shard:
        assert shard.attrs["model_family"] == "prott5"
    assert "(ProtT5, 2 layers, dim 64)" in (workdir / "logs/embed/rank_0.log").read_text()
