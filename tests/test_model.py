import argparse
import os

import pytest
import torch

from esmshard import EsmShardError
from esmshard.model import load_model, resolve_checkpoint, write_random_checkpoint


def test_tiny_checkpoint_loads_through_the_released_format(tiny_checkpoint):
    network, alphabet = load_model(str(tiny_checkpoint))
    assert (network.num_layers, network.embed_dim, network.attention_heads) == (2, 32, 4)
    assert not network.training
    saved = torch.load(tiny_checkpoint, weights_only=False)
    assert isinstance(saved["cfg"]["model"], argparse.Namespace)
    assert all(k.startswith(("encoder.sentence_encoder.", "encoder.lm_head")) for k in saved["model"])
    assert not any("contact_head" in k for k in saved["model"])  # as released: no regression weights
    key = "encoder.sentence_encoder.layers.1.self_attn.k_proj.weight"
    assert torch.equal(network.layers[1].self_attn.k_proj.weight, saved["model"][key])


def test_any_file_name_works_without_regression_file(tmp_path):
    path = write_random_checkpoint(tmp_path / "my finetuned model.pt", 1, 16, 2)
    network, _ = load_model(str(path))
    assert network.num_layers == 1


def test_text_file_is_rejected(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(EsmShardError, match=f"model: {path} is not a checkpoint in fair-esm's format"):
        load_model(str(path))


def test_other_torch_file_is_rejected(tmp_path):
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(EsmShardError, match="is not an ESM-2 or ESM-1b checkpoint"):
        load_model(str(path))


def test_esm_layout_with_wrong_weights_is_rejected(tmp_path, tiny_checkpoint):
    data = torch.load(tiny_checkpoint, weights_only=False)
    data["model"] = {k: v for k, v in data["model"].items() if "layers.1." not in k}
    path = tmp_path / "broken.pt"
    torch.save(data, path)
    with pytest.raises(EsmShardError, match="does not hold ESM-2 weights: missing layers.1.fc1.bias, .* and 12 more"):
        load_model(str(path))


class Payload:
    """Unpickling this would call a function: what a malicious checkpoint does."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_wrong_shapes_are_rejected(tmp_path, tiny_checkpoint):
    data = torch.load(tiny_checkpoint, weights_only=False)
    data["cfg"]["model"].encoder_embed_dim = 48
    path = tmp_path / "mismatch.pt"
    torch.save(data, path)
    with pytest.raises(EsmShardError, match="does not hold ESM-2 weights: .*size mismatch"):
        load_model(str(path))


def test_legacy_serialization_loads_too(tmp_path, tiny_checkpoint):
    data = torch.load(tiny_checkpoint, weights_only=False)
    path = tmp_path / "legacy.pt"
    torch.save(data, path, _use_new_zipfile_serialization=False)
    network, _ = load_model(str(path))
    assert network.num_layers == 2


def test_arbitrary_pickled_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"cfg": {"model": Payload()}, "model": {}}, path)
    with pytest.raises(EsmShardError, match="loads safely"):
        load_model(str(path))
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_unknown_model_name(tmp_path):
    with pytest.raises(
        EsmShardError,
        match="neither an existing checkpoint file or model directory, a Hugging Face hub id .* nor a released model",
    ):
        resolve_checkpoint("esm2_t99_1T_UR50D")


def test_download_lands_only_a_whole_checkpoint_of_the_named_shape(tmp_path, monkeypatch):
    from esmshard.architectures import ESM2_MODELS, checkpoint_architecture
    from esmshard.model import URL_ENV, download

    source = write_random_checkpoint(tmp_path / "mirror/esm2_t6_8M_UR50D.pt", *ESM2_MODELS["esm2_t6_8M_UR50D"])
    monkeypatch.setenv(URL_ENV, f"file://{tmp_path}/mirror/{{name}}.pt")
    path = download("esm2_t6_8M_UR50D", tmp_path / "hub/esm2_t6_8M_UR50D.pt")
    assert checkpoint_architecture(path) == ("esm2", ESM2_MODELS["esm2_t6_8M_UR50D"])
    with pytest.raises(EsmShardError, match=r"cannot download esm2_t12_35M_UR50D from file://.*; download it where"):
        download("esm2_t12_35M_UR50D", tmp_path / "hub/esm2_t12_35M_UR50D.pt")
    source.rename(tmp_path / "mirror/esm2_t12_35M_UR50D.pt")  # the wrong model under that name
    with pytest.raises(EsmShardError, match=r"holds an ESM-2 model of shape \(6, 320, 20\), not esm2_t12_35M_UR50D"):
        download("esm2_t12_35M_UR50D", tmp_path / "hub/esm2_t12_35M_UR50D.pt")
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["esm2_t6_8M_UR50D.pt"]  # nothing half-written


def test_a_fasta_given_as_model_is_named_without_pytorch_advice(tmp_path):
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text(">p1\nMKV\n")
    with pytest.raises(EsmShardError) as error:
        load_model(str(fasta))
    assert str(fasta) in str(error.value) and "weights_only" not in str(error.value)


def test_a_checkpoints_identity_is_hashed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    from esmshard import architectures
    from esmshard.architectures import checkpoint_identity, resolve_model

    cache = tmp_path / "cache"
    path = write_random_checkpoint(tmp_path / "m.pt", 2, 32, 4, seed=1)
    first = checkpoint_identity(resolve_model(str(path)), cache)
    assert (first["num_layers"], first["embed_dim"]) == (2, 32) and first["size"] == path.stat().st_size
    monkeypatch.setattr(architectures, "checkpoint_digest", lambda p: pytest.fail("hashed an unchanged file again"))
    assert checkpoint_identity(resolve_model(str(path)), cache) == first
    monkeypatch.undo()
    times = path.stat()
    write_random_checkpoint(path, 2, 32, 4, seed=2)  # another model at the same path...
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))  # ...made to look like the old file
    assert path.stat().st_size == times.st_size
    second = checkpoint_identity(resolve_model(str(path)), cache)
    assert second["digest"] != first["digest"]


def test_identities_are_shared_by_every_run_of_the_user_and_an_unwritable_cache_only_costs_hashing(
    tmp_path, monkeypatch
):
    from esmshard.architectures import checkpoint_identity, identity_cache, resolve_model

    monkeypatch.setenv("ESMSHARD_CACHE", str(tmp_path / "user cache"))
    assert identity_cache() == tmp_path / "user cache" / "checkpoint_identity"
    path = write_random_checkpoint(tmp_path / "m.pt", 2, 32, 4, seed=1)
    identity = checkpoint_identity(resolve_model(str(path)))
    assert len(list(identity_cache().glob("*.json"))) == 1
    blocked = tmp_path / "not a directory"
    blocked.write_text("")
    assert checkpoint_identity(resolve_model(str(path)), blocked) == identity


@pytest.mark.parametrize("damage", ["truncated", "field missing", "field of another type"])
def test_a_damaged_identity_cache_entry_is_hashed_again_never_fatal(tmp_path, damage):
    import json

    from esmshard.architectures import checkpoint_identity, resolve_model

    cache = tmp_path / "cache"
    path = write_random_checkpoint(tmp_path / "m.pt", 2, 32, 4, seed=1)
    identity = checkpoint_identity(resolve_model(str(path)), cache)
    (entry,) = cache.glob("*.json")
    cached = json.loads(entry.read_text())
    if damage == "truncated":
        entry.write_text(entry.read_text()[:40])
    else:
        if damage == "field missing":
            del cached["identity"]["num_layers"]
        else:
            cached["identity"]["embed_dim"] = "32"
        entry.write_text(json.dumps(cached))
    assert checkpoint_identity(resolve_model(str(path)), cache) == identity
    assert json.loads(entry.read_text())["identity"] == identity  # rewritten whole
