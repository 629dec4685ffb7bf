"""ESM-1b (and ESM-1v, its architecture): a checkpoint in fair-esm's release layout and a Hugging
Face directory, each checked against its own implementation (fair-esm's loader and forward;
transformers' EsmModel), through both engines and the workflow."""

import json
import re

import esm
import h5py
import numpy as np
import pytest
import torch

from conftest import (
    AMINO,
    completed_run,
    config_for,
    fair_esm_outputs,
    read_embeddings,
    run_snakemake,
    split_rows,
    write_fasta,
)
from esmshard import EsmShardError, embed
from esmshard.architectures import checkpoint_identity, resolve_model
from esmshard.model import load_model, write_random_checkpoint

LENGTHS = (300, 1, 2, 50, 1022, 77)


@pytest.fixture(scope="module")
def esm1b_checkpoint(tmp_path_factory):
    """ESM-1b's architecture at 2 layers of width 64 (4 heads), random weights, in the layout of
    fair-esm's esm1b_t33_650M_UR50S.pt (fairseq's args, encoder.sentence_encoder. names, a
    LayerNorm before the layers)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("esm1b") / "esm1b_t2.pt", 2, 64, 4, seed=5, family="esm1b")


@pytest.fixture(scope="module")
def fair_esm_model(esm1b_checkpoint):
    """fair-esm's own loader of ESM-1b files on that checkpoint (its name decides the loader)."""
    data = torch.load(esm1b_checkpoint, weights_only=False)
    network, alphabet = esm.pretrained.load_model_and_alphabet_core("esm1b_t33_650M_UR50S", data)
    assert network.model_version == "ESM-1b" and network.emb_layer_norm_before is not None
    return network.eval(), alphabet


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(11)
    return {f"p{i}": "".join(rng.choice(list(AMINO), size=n)) for i, n in enumerate(LENGTHS)}


@pytest.mark.parametrize("engine", ["reference", "packed"])
def test_every_output_equals_fair_esms_own_esm1b(esm1b_checkpoint, fair_esm_model, sequences, engine):
    network, alphabet = fair_esm_model
    result = embed(
        sequences,
        model=esm1b_checkpoint,
        layers=[0, 1, -1],
        pooling=["mean", "bos", "per_residue"],
        engine=engine,
        precision="float32",
        device="cpu",
    )
    assert result["ids"] == list(sequences)
    for layer in (0, 1, 2):
        per_residue = result[f"per_residue/layer_{layer}"]
        for i, sequence in enumerate(sequences.values()):
            expected = fair_esm_outputs(network, alphabet, sequence, layer)
            for name, got in (("mean", result[f"mean/layer_{layer}"][i]), ("bos", result[f"bos/layer_{layer}"][i])):
                assert np.abs(got - expected[name]).max() <= 1e-5, (engine, layer, name, len(sequence))
            assert np.abs(per_residue[i] - expected["per_residue"]).max() <= 1e-5, (engine, layer, len(sequence))


def test_the_family_is_read_from_the_files_and_model_type_must_match(esm1b_checkpoint, tiny_checkpoint):
    identity = checkpoint_identity(resolve_model(str(esm1b_checkpoint)))
    assert (identity["family"], identity["num_layers"], identity["embed_dim"]) == ("esm1b", 2, 64)
    assert checkpoint_identity(resolve_model(str(tiny_checkpoint)))["family"] == "esm2"
    network, _ = load_model(str(esm1b_checkpoint))
    assert isinstance(network, esm.ProteinBertModel)
    one = {"p": "MKTAYIAKQR"}
    for model_type in ("esm1b", "esm1v", None):  # ESM-1v is ESM-1b's architecture
        assert embed(one, model=esm1b_checkpoint, model_type=model_type, device="cpu")["mean/layer_2"].shape == (1, 64)
    with pytest.raises(ValueError, match=rf"model_type: 'esm2', but {esm1b_checkpoint} holds an ESM-1b model"):
        embed(one, model=esm1b_checkpoint, model_type="esm2", device="cpu")
    with pytest.raises(ValueError, match=rf"model_type: 'esm1v', but {tiny_checkpoint} holds an ESM-2 model"):
        embed(one, model=tiny_checkpoint, model_type="esm1v", device="cpu")


def test_another_fair_esm_architecture_is_named(tmp_path, esm1b_checkpoint):
    data = torch.load(esm1b_checkpoint, weights_only=False)
    data["args"].arch = "protein_bert_base"  # ESM-1's
    torch.save(data, tmp_path / "esm1.pt")
    with pytest.raises(EsmShardError, match=r"fair-esm checkpoint of architecture 'protein_bert_base', which esmshard"):
        checkpoint_identity(resolve_model(str(tmp_path / "esm1.pt")))


@pytest.fixture(scope="module")
def hf_esm1b(tmp_path_factory):
    """transformers' EsmForMaskedLM of ESM-1b's kind (learned absolute positions, a LayerNorm on
    the embeddings), random weights with perturbed LayerNorms, as save_pretrained writes it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.EsmConfig(
        vocab_size=33,
        pad_token_id=1,
        mask_token_id=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        position_embedding_type="absolute",
        max_position_embeddings=1026,
        token_dropout=True,
        emb_layer_norm_before=True,
        layer_norm_eps=1e-5,
    )
    torch.manual_seed(3)
    model = transformers.EsmForMaskedLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    directory = tmp_path_factory.mktemp("hf") / "esm1b_tiny"
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("engine", ["reference", "packed"])
def test_a_hugging_face_esm1b_directory_embeds_as_transformers_does(hf_esm1b, sequences, engine):
    transformers = pytest.importorskip("transformers")
    model = transformers.EsmModel.from_pretrained(hf_esm1b, add_pooling_layer=False).eval()
    result = embed(
        sequences, model=hf_esm1b, layers=[1, 2], pooling=["mean", "per_residue"], engine=engine, device="cpu"
    )
    convert = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter(truncation_seq_length=1022)
    lengths = [min(len(s), 1022) for s in sequences.values()]
    with torch.no_grad():
        for i, sequence in enumerate(sequences.values()):
            hidden = model(convert([("x", sequence)])[2], output_hidden_states=True).hidden_states
            for layer in (1, 2):
                residues = hidden[layer][0, 1 : lengths[i] + 1].numpy()
                per_residue = split_rows(result[f"per_residue/layer_{layer}"][i], [lengths[i]])[0]
                assert np.abs(result[f"mean/layer_{layer}"][i] - residues.mean(0)).max() <= 1e-5, (layer, i)
                assert np.abs(per_residue - residues).max() <= 1e-5, (layer, i)
    assert checkpoint_identity(resolve_model(str(hf_esm1b)))["family"] == "esm1b"


@pytest.mark.workflow
def test_the_workflow_embeds_an_esm1b_checkpoint_on_two_ranks_and_records_its_family(
    tmp_path, esm1b_checkpoint, fair_esm_model, sequences
):
    network, alphabet = fair_esm_model
    fasta = write_fasta(tmp_path / "p.fasta", sequences)
    workdir = completed_run(tmp_path, config_for(fasta, esm1b_checkpoint, world_size=2, model_type="esm1v"))
    ids, vectors, attrs = read_embeddings(workdir / "results/embeddings.h5", "mean/layer_2")
    assert ids == list(sequences) and attrs["model_family"] == "esm1b"
    for vector, sequence in zip(vectors, sequences.values()):
        assert np.abs(vector - fair_esm_outputs(network, alphabet, sequence, 2)["mean"]).max() <= 1e-4
    for rank in (0, 1):
        with h5py.File(workdir / f"results/shards/shard_{rank}.h5") as shard:
            assert shard.attrs["model_family"] == "esm1b"
    assert "(ESM-1b, 2 layers, dim 64)" in (workdir / "logs/embed/rank_0.log").read_text()
    manifest = json.loads((workdir / "results/manifest.json").read_text())
    assert manifest["model_family"] == "esm1b" and manifest["model"] == str(esm1b_checkpoint)
    (tmp_path / "other").mkdir()
    result = run_snakemake(tmp_path / "other", config_for(fasta, esm1b_checkpoint, model_type="esm2"))
    assert result.returncode != 0 and not (tmp_path / "other/results").exists()
    assert re.search(rf"model_type: 'esm2', but {esm1b_checkpoint} holds an ESM-1b model", result.stderr)
