"""Hugging Face ESM-2 models (a directory as transformers saves it, a hub id in the HF cache)
embedded by the real workflow, against transformers' own EsmModel."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import esm
import numpy as np
import pytest
import torch

from conftest import completed_run, config_for, random_sequences, read_embeddings, run_snakemake, write_fasta
from esmshard import EsmShardError, embed
from esmshard.architectures import model_inputs, resolve_model

pytestmark = pytest.mark.workflow  # runs the real snakemake: not in make test-fast

transformers = pytest.importorskip("transformers")  # a test dependency only (requirements.txt)

HUB_ID = "esmshard-test/esm2_tiny"
LAYERS = [1, -1]  # layer 1 of 2 (the middle) and the last, after the final LayerNorm


def tiny_esm(layer_norm_eps: float, seed: int, kind: str = "EsmForMaskedLM", **config):
    """transformers' ``kind`` (EsmForMaskedLM, or a task model) of ESM-2's kind (2 layers, width
    64), random weights, the LayerNorms perturbed so that their weights and eps show; ``config``
    overrides ESM-2's config."""
    config = transformers.EsmConfig(
        **{
            "vocab_size": 33,
            "pad_token_id": 1,
            "mask_token_id": 32,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "position_embedding_type": "rotary",
            "token_dropout": True,
            "emb_layer_norm_before": False,
            "layer_norm_eps": layer_norm_eps,
            **config,
        }
    )
    torch.manual_seed(seed)
    model = getattr(transformers, kind)(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model


def esm_model_outputs(directory, sequences: dict[str, str], **config) -> dict[int, np.ndarray]:
    """transformers' EsmModel from ``directory`` (``config`` overriding its config.json): per layer
    (fair-esm's numbering), each sequence's hidden states' mean over its residues (no BOS, EOS)."""
    model = transformers.EsmModel.from_pretrained(directory, add_pooling_layer=False, **config)
    return hidden_state_means(model, sequences)


def hidden_state_means(model, sequences: dict[str, str]) -> dict[int, np.ndarray]:
    """transformers' EsmModel ``model``'s outputs: per layer (fair-esm's numbering), each
    sequence's hidden states' mean over its residues (no BOS, EOS)."""
    model.eval()
    convert = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()  # the same token ids
    means = {layer: [] for layer in (1, 2)}
    with torch.no_grad():
        for sequence in sequences.values():
            tokens = convert([("x", sequence)])[2]
            out = model(tokens, output_hidden_states=True)
            assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # after the final LayerNorm
            for layer in means:
                means[layer].append(out.hidden_states[layer][0, 1 : len(sequence) + 1].mean(0).numpy())
    return {layer: np.stack(vectors) for layer, vectors in means.items()}


@pytest.fixture(scope="module")
def sequences():
    return random_sequences(12, seed=21, median=60, cap=300)


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """EsmForMaskedLM.save_pretrained: config.json and model.safetensors, with another LayerNorm
    eps than fair-esm's (1e-5, as the hub's ESM-2 configs say)."""
    directory = tmp_path_factory.mktemp("hf") / "esm2_tiny"
    tiny_esm(1e-3, seed=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds HUB_ID as huggingface_hub lays it out, with weights in
    pytorch_model.bin (what older transformers wrote; their names differ from save_pretrained's now)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    model = tiny_esm(1e-5, seed=4)
    model.config.save_pretrained(snapshot)
    torch.save(model.state_dict(), snapshot / "pytorch_model.bin")
    for file in list(snapshot.iterdir()):  # snapshots hold links into blobs/, as the hub cache does
        blob = repo / "blobs" / f"{file.name}-blob"
        blob.parent.mkdir(exist_ok=True)
        file.rename(blob)
        file.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(revision)
    (repo / "refs/v1").write_text(revision)  # a tag, as a download of HUB_ID@v1 records it
    return home


REVISION = "0123456789abcdef0123456789abcdef01234567"  # hf_home's one snapshot


def offline(hf_home) -> dict:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def directory_run(tmp_path_factory, sequences, hf_directory):
    workdir = tmp_path_factory.mktemp("hf_run")
    fasta = write_fasta(workdir / "p.fasta", sequences)
    return completed_run(workdir, config_for(fasta, hf_directory, layers=LAYERS, precision="float32"))


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory, sequences, hf_home):
    """The hub id, offline, with the reference engine (the directory's run has the packed one);
    the config's own file is a link into the cache's blobs."""
    workdir = tmp_path_factory.mktemp("hub_run")
    fasta = write_fasta(workdir / "p.fasta", sequences)
    config = config_for(fasta, HUB_ID, layers=LAYERS, precision="float32", engine="reference")
    result = run_snakemake(workdir, config, env=offline(hf_home))
    assert result.returncode == 0, result.stderr
    return workdir, config, result.stderr


def assert_equal_to_transformers(workdir, directory, sequences, **config):
    expected = esm_model_outputs(directory, sequences, **config)
    for layer in (1, 2):
        ids, vectors, attrs = read_embeddings(workdir / "results/embeddings.h5", f"mean/layer_{layer}")
        assert ids == list(sequences) and list(attrs["layers"]) == [1, 2]
        assert np.abs(vectors - expected[layer]).max() <= 1e-5, layer


def test_a_saved_esm_for_masked_lm_directory_embeds_as_transformers_does(directory_run, hf_directory, sequences):
    assert_equal_to_transformers(directory_run, hf_directory, sequences)
    assert json.loads((directory_run / "results/manifest.json").read_text())["random_weights"] is False
    with pytest.raises(AssertionError):  # the config's eps (1e-3) matters: fair-esm's 1e-5 is not it
        assert_equal_to_transformers(directory_run, hf_directory, sequences, layer_norm_eps=1e-5)


def test_a_hub_id_in_the_cache_embeds_offline_from_pytorch_model_bin(hub_run, hf_home, sequences):
    workdir, config, log = hub_run
    assert not re.search(r"^download_model\s", log, re.M)  # found in the cache: nothing downloaded
    snapshot = next((hf_home / "hub").glob("models--*/snapshots/*"))
    assert_equal_to_transformers(workdir, snapshot, sequences)
    result = run_snakemake(workdir, config, env=offline(hf_home))
    assert result.returncode == 0 and "Nothing to be done" in result.stderr, result.stderr


def test_an_esm_model_saved_in_shards_loads_the_same_encoder(tmp_path, hf_directory):
    from esmshard.model import load_model

    tiny_esm(1e-3, seed=3).esm.save_pretrained(tmp_path, max_shard_size="20KB")  # EsmModel: no "esm.", no LM head
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    sharded, whole = (load_model(str(directory))[0].state_dict() for directory in (tmp_path, hf_directory))
    for name, tensor in whole.items():
        if not name.startswith(("lm_head.", "contact_head.")):
            assert torch.equal(sharded[name], tensor), name
    assert not sharded["lm_head.dense.weight"].any()  # a head the directory lacks: zeros, never used


@pytest.fixture(scope="module", params=["EsmForSequenceClassification", "EsmForTokenClassification"])
def fine_tuned(request, tmp_path_factory):
    """A fine-tuned model as transformers saves it: the encoder under "esm.", and beside it the task
    head (classifier.*); token_dropout off, as EsmConfig's default (the other directories have it on)."""
    model = tiny_esm(1e-5, seed=5, kind=request.param, token_dropout=False, num_labels=3)
    directory = tmp_path_factory.mktemp("fine_tuned") / request.param
    model.save_pretrained(directory)
    return model, directory


def test_a_fine_tuned_directory_embeds_as_its_encoder_logging_the_head_ignored(fine_tuned, sequences, caplog):
    model, directory = fine_tuned
    caplog.set_level(logging.INFO, logger="esmshard")
    result = embed(sequences, model=directory, layers=LAYERS, device="cpu", precision="float32")
    expected = hidden_state_means(model.esm, sequences)
    assert result["ids"] == list(sequences)
    for layer in (1, 2):  # the middle layer and the last
        assert np.abs(result[f"mean/layer_{layer}"] - expected[layer]).max() <= 1e-5, layer
    dropout_on = esm_model_outputs(directory, sequences, token_dropout=True)  # the config's false is honoured
    assert np.abs(result["mean/layer_2"] - dropout_on[2]).max() > 1e-3
    head = sorted(name for name in model.state_dict() if name.startswith("classifier."))
    logged = [record.getMessage() for record in caplog.records if "task head" in record.getMessage()]
    assert logged == [
        f"model: {directory}: ignored {len(head)} weights of a task head ({', '.join(head)}): "
        f"embeddings are the encoder's outputs, before any head"
    ]


def test_an_unknown_or_missing_encoder_weight_beside_a_task_head_is_named(fine_tuned, tmp_path):
    from safetensors.torch import load_file, save_file

    from esmshard.model import load_model

    directory = shutil.copytree(fine_tuned[1], tmp_path / "model")
    weights = load_file(directory / "model.safetensors")
    adapter = "esm.encoder.layer.0.attention.self.query.lora_A.weight"  # an adapter left unmerged
    save_file(
        {**weights, adapter: torch.zeros(4, 64), "score.weight": torch.zeros(3, 64)}, directory / "model.safetensors"
    )
    refused = f"model: {directory} does not hold ESM-2 weights: missing "
    with pytest.raises(EsmShardError, match=re.escape(f"{refused}none, unexpected {adapter}, score.weight")):
        load_model(str(directory))
    del weights["esm.encoder.layer.1.output.dense.weight"]
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(
        EsmShardError, match=re.escape(f"{refused}layers.1.fc2.weight (by fair-esm names), unexpected none")
    ):
        load_model(str(directory))


def test_a_hub_id_names_its_cache_file_as_the_input_before_and_after_the_download(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ref = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "refs/main"
    assert model_inputs(HUB_ID) == ([ref], False)
    assert model_inputs("esmshard-test/not_downloaded")[1] is True  # rule download_model fetches it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        EsmShardError,
        match=r"not_downloaded is neither a directory nor in the Hugging Face cache "
        r".*HF_HUB_OFFLINE forbids downloading it: download it where there is network with "
        r"'python -m esmshard download esmshard-test/not_downloaded'",
    ):
        model_inputs("esmshard-test/not_downloaded")


def test_a_hub_id_at_a_revision_is_that_revisions_snapshot(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = hf_home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    assert model_inputs(f"{HUB_ID}@v1") == ([repo / "refs/v1"], False)
    assert model_inputs(f"{HUB_ID}@{REVISION}") == ([snapshot / "config.json"], False)  # a commit never moves
    for model in (f"{HUB_ID}@v1", f"{HUB_ID}@{REVISION}", HUB_ID):
        assert resolve_model(model).location == snapshot
    with pytest.raises(EsmShardError, match=r"esm2_tiny@v2 is neither a directory nor in the Hugging Face cache"):
        model_inputs(f"{HUB_ID}@v2")


# Where each cache setting puts the hub cache, as huggingface_hub reads it when it is imported.
CACHE_SETTINGS = {
    "HF_HOME": lambda home: {"HF_HOME": str(home)},
    "HF_HUB_CACHE": lambda home: {"HF_HOME": str(home / "elsewhere"), "HF_HUB_CACHE": str(home / "hub")},
    "HUGGINGFACE_HUB_CACHE": lambda home: {"HUGGINGFACE_HUB_CACHE": str(home / "hub")},
    "XDG_CACHE_HOME": lambda home: {"XDG_CACHE_HOME": str(home.parent)},  # its huggingface/ is the default HF_HOME
}


@pytest.mark.parametrize("setting", sorted(CACHE_SETTINGS))
@pytest.mark.parametrize("offline", ["", "1"])
def test_the_cache_is_found_where_huggingface_hub_finds_it(hf_home, tmp_path, setting, offline):
    """esmshard reads the hub cache without huggingface_hub (parse time needs the standard library
    alone): each setting and revision must resolve to the file huggingface_hub's own
    try_to_load_from_cache returns, in a fresh process that reads the environment as it starts."""
    home = tmp_path / "huggingface"
    shutil.copytree(hf_home, home, symlinks=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE", "XDG_"))}
    env.update(CACHE_SETTINGS[setting](home), HF_HUB_OFFLINE=offline, PYTHONPATH=os.pathsep.join(sys.path))
    models = [HUB_ID, f"{HUB_ID}@v1", f"{HUB_ID}@{REVISION}", f"{HUB_ID}@v2", "esmshard-test/absent"]
    script = (
        "import json, sys\n"
        "from huggingface_hub import try_to_load_from_cache\n"
        "from esmshard.huggingface import hub_snapshot, split_hub_id\n"
        "rows = []\n"
        "for model in sys.argv[1:]:\n"
        "    repo, revision = split_hub_id(model)\n"
        "    theirs = try_to_load_from_cache(repo, 'config.json', revision=revision)\n"
        "    ours = hub_snapshot(model)\n"
        "    theirs = theirs if isinstance(theirs, str) else None\n"
        "    rows.append([theirs, None if ours is None else str(ours / 'config.json')])\n"
        "print(json.dumps(rows))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *models], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    for model, (theirs, ours) in zip(models, rows):
        assert ours == theirs, (model, setting)
    assert [ours is not None for _, ours in rows] == [True, True, True, False, False]


@pytest.mark.parametrize(
    "model",
    [
        "resources/esm2_t33_650M_UR50D.pt",
        "models/esm2/model.safetensors",
        "./esm2_finetuned",
        "~/no_such_esm2_directory",
    ],
)
def test_a_missing_path_is_named_as_such_not_looked_for_on_the_hub(model, hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: a hub id would be downloaded
    message = re.escape(f"model: {Path(model).expanduser()} does not exist (a checkpoint file or model directory")
    for resolve in (model_inputs, resolve_model):
        with pytest.raises(EsmShardError, match=message):
            resolve(model)


def test_a_missing_hub_id_offline_stops_before_any_job_saying_what_to_do(tmp_path, hf_home):
    fasta = write_fasta(tmp_path / "p.fasta", {"p1": "MKV"})
    result = run_snakemake(tmp_path, config_for(fasta, "facebook/esm2_t33_650M_UR50D"), env=offline(hf_home))
    assert result.returncode != 0
    assert (
        f"model: facebook/esm2_t33_650M_UR50D is neither a directory nor in the Hugging Face cache "
        f"{hf_home}/hub" in result.stderr
    )
    assert "'python -m esmshard download facebook/esm2_t33_650M_UR50D'" in result.stderr
    assert not (tmp_path / "results").exists()


def test_the_download_command_offline_says_it_cannot_download(tmp_path):
    # a process of its own: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    result = subprocess.run(
        [sys.executable, "-m", "esmshard", "download", HUB_ID, str(tmp_path / "model")],
        capture_output=True,
        text=True,
        env={**os.environ, **offline(tmp_path)},
    )
    assert result.returncode == 1
    assert f"error: model: cannot download {HUB_ID} from the Hugging Face hub (" in result.stderr
    assert not (tmp_path / "model" / "config.json").exists()


def test_a_bert_directory_stops_before_any_job_naming_it(tmp_path):
    directory = tmp_path / "bert"
    transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(directory)
    fasta = write_fasta(tmp_path / "p.fasta", {"p1": "MKV"})
    result = run_snakemake(tmp_path, config_for(fasta, directory))
    assert result.returncode != 0
    assert (
        f"model: {directory} holds a bert model (config.json model_type 'bert'), not ESM-2 or ESM-1b ('esm')"
        in result.stderr
    )
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"emb_layer_norm_before": True}, "emb_layer_norm_before with rotary positions"),
        (
            {"position_embedding_type": "absolute", "max_position_embeddings": 512},
            "max_position_embeddings 512: ESM-1b's learned positions take 1026",
        ),
        (
            {"position_embedding_type": "relative_key"},
            "position_embedding_type 'relative_key': the engine runs rotary positions (ESM-2's) and absolute",
        ),
        ({"token_dropout": "yes"}, "token_dropout 'yes' is neither true nor false"),
        (
            {"architectures": ["BertForMaskedLM"]},
            "architectures ['BertForMaskedLM']: esmshard reads the encoder of EsmModel, EsmForMaskedLM, "
            "EsmForSequenceClassification, EsmForTokenClassification (for another class, save its ESM "
            "encoder alone: model.esm.save_pretrained(DIRECTORY))",
        ),
        ({"architectures": ["EsmForProteinFolding"]}, "architectures ['EsmForProteinFolding']"),
        ({"is_folding_model": True}, "it is ESMFold"),
        ({"vocab_size": 35}, "its vocabulary"),
        ({"layer_norm_eps": "1e-5"}, "layer_norm_eps '1e-5' is not a positive number"),
        ({"rope_theta": None}, "rope_theta None is not a positive number"),
    ],
)
def test_esm_configs_the_engine_cannot_run_are_named(tmp_path, hf_directory, change, problem):
    directory = tmp_path / "model"
    shutil.copytree(hf_directory, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(
        EsmShardError, match=f"model: {directory} is an ESM model that esmshard cannot run: " + re.escape(problem)
    ):
        resolve_model(str(directory))


def test_a_directory_without_weights_or_config_is_named(tmp_path, hf_directory):
    directory = tmp_path / "model"
    shutil.copytree(hf_directory, directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(
        EsmShardError, match=f"model: {directory} has no weights file: expected model.safetensors or pytorch_model.bin"
    ):
        resolve_model(str(directory))
    (directory / "config.json").unlink()
    with pytest.raises(EsmShardError, match=f"model: {directory} is a directory without config.json"):
        resolve_model(str(directory))
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (directory / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(
        EsmShardError,
        match=f"model: {directory} holds a PEFT adapter \\(adapter_config.json\\), "
        "not a whole model: merge it into its base model",
    ):
        resolve_model(str(directory))


class Payload:
    """Unpickling this would call a function: what a malicious pytorch_model.bin does."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_a_pytorch_model_bin_is_read_by_the_weights_only_loader(tmp_path, hf_directory, capsys):
    from esmshard.model import load_model

    directory = tmp_path / "model"
    shutil.copytree(hf_directory, directory)
    (directory / "model.safetensors").unlink()
    torch.save({"esm.embeddings.word_embeddings.weight": Payload()}, directory / "pytorch_model.bin")
    with pytest.raises(
        EsmShardError, match=f"model: {directory}/pytorch_model.bin is not a PyTorch weights file that loads safely"
    ):
        load_model(str(directory))
    assert "unpickled arbitrary code" not in capsys.readouterr().out
