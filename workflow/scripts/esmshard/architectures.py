"""Which model the option ``model`` names, where its files are, and its identity: the released
ESM-2, ESM-1b and ESM-1v models, checkpoint files, Hugging Face directories and hub ids (no torch
needed).

A model's family is read from its files: a fair-esm checkpoint holding ``cfg`` is ESM-2 (fair-esm
loads it so too), one holding ``args`` of the ``roberta_large`` architecture is ESM-1b; a Hugging
Face config with rotary positions is ESM-2, with absolute ones ESM-1b. ESM-1v's five models have
ESM-1b's architecture and files, so they are family esm1b (the option ``model_type`` may say
esm1v)."""

import argparse
import collections
import hashlib
import json
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from esmshard import EsmShardError
from esmshard.files import atomic_output
from esmshard.huggingface import HUB_ID, hub_cache, hub_offline, hub_ref, hub_snapshot, model_files, read_config


class Architecture(NamedTuple):
    layers: int
    embed_dim: int
    heads: int


ESM2_MODELS = {
    "esm2_t6_8M_UR50D": Architecture(6, 320, 20),
    "esm2_t12_35M_UR50D": Architecture(12, 480, 20),
    "esm2_t30_150M_UR50D": Architecture(30, 640, 20),
    "esm2_t33_650M_UR50D": Architecture(33, 1280, 20),
    "esm2_t36_3B_UR50D": Architecture(36, 2560, 40),
    "esm2_t48_15B_UR50D": Architecture(48, 5120, 40),
}
ESM1B_MODELS = {
    "esm1b_t33_650M_UR50S": Architecture(33, 1280, 20),
    **{f"esm1v_t33_650M_UR90S_{i}": Architecture(33, 1280, 20) for i in range(1, 6)},
}
RELEASED_MODELS = {**ESM2_MODELS, **ESM1B_MODELS}
# ESM C's released names, as EvolutionaryScale's package names them, and the hub repositories
# that hold their weights (data/weights/esmc_*.pth), where that package downloads them too.
ESMC_MODELS = {"esmc_300m": "EvolutionaryScale/esmc-300m-2024-12", "esmc_600m": "EvolutionaryScale/esmc-600m-2024-12"}
# Every released name's shape.
RELEASED_SHAPES = {**RELEASED_MODELS, "esmc_300m": Architecture(30, 960, 15), "esmc_600m": Architecture(36, 1152, 18)}

# The families the engine runs, in words, and the option model_type's values with the family each names.
FAMILIES = {"esm2": "ESM-2", "esm1b": "ESM-1b", "esmc": "ESM C", "prott5": "ProtT5"}
MODEL_TYPES = {"esm2": "esm2", "esm1b": "esm1b", "esm1v": "esm1b", "esmc": "esmc", "prott5": "prott5"}
# The families whose tokens start with no BOS (so no BOS pooling).
WITHOUT_BOS = ("prott5",)
# ESM C's head width in both released models (960 = 15 x 64, 1152 = 18 x 64): its state dicts
# record no config, and the heads cannot be read from the tensors' shapes.
ESMC_HEAD_DIM = 64

# Residues per piece of a protein each family embeds at once (longer proteins are truncated or cut
# into windows, outputs.py): ESM-2 was trained on at most 1022 residues plus BOS and EOS, ESM-1b
# has 1024 learned positions; ESM C was trained on 2048 (EvolutionaryScale's own API takes no
# more); ProtT5's relative positions have no limit and Rostlab's script embeds whole proteins, so
# its limit only bounds memory (a 10,000-residue protein's padded attention: 32 heads x L^2 half
# floats, 6.4 GB).
MAX_RESIDUES = {"esm2": 1022, "esm1b": 1022, "esmc": 2048, "prott5": 10000}


def release_family(name: str) -> str:
    return "esm2" if name in ESM2_MODELS else "esmc" if name in ESMC_MODELS else "esm1b"


def check_model(model_type: str | None, poolings, checkpoint: "Checkpoint") -> None:
    """A ``model_type`` (None: any) that names another family than the model's files, or BOS
    pooling of a model without BOS, is an error."""
    if model_type is None and "bos" not in poolings:
        return
    family = model_family(checkpoint)
    if model_type is not None and MODEL_TYPES[model_type] != family:
        raise EsmShardError(
            f"model_type: {model_type!r}, but {checkpoint.location} holds an {FAMILIES[family]} model "
            f"(model_type {' or '.join(t for t, f in MODEL_TYPES.items() if f == family)}); "
            f"set model_type to match, or leave it out"
        )
    if family in WITHOUT_BOS and "bos" in poolings:
        raise EsmShardError(
            f"pooling: bos, but {FAMILIES[family]} ({checkpoint.location}) has no BOS token: pool mean or per_residue"
        )


def model_family(checkpoint: "Checkpoint") -> str:
    """The family of a model on disk, from its config (see the module docstring)."""
    if checkpoint.location.is_dir():
        return read_config(checkpoint.location).family
    return _checkpoint_config(checkpoint.location)[0]


def released_checkpoint(name: str) -> Path:
    """Where torch.hub (and so fair-esm) keeps a released model's checkpoint: a model downloaded
    before, by fair-esm or by esmshard, is found there (torch.hub.get_dir's rule, without torch)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(torch_home).expanduser() / "hub" / "checkpoints" / f"{name}.pt"


class Checkpoint(NamedTuple):
    """A model on disk: ``location`` is what the loader reads (a fair-esm checkpoint file, or a
    Hugging Face model directory); ``files`` are what it is made of (their content is its identity)."""

    location: Path
    files: tuple[Path, ...]


def resolve_model(model: str) -> Checkpoint:
    """The model the option ``model`` names, on disk: a checkpoint file, a Hugging Face model
    directory (checked to be an ESM model the engine runs), a released model in torch.hub's cache, or
    a hub id (org/name) in the Hugging Face cache. Anything else, or a model not downloaded yet,
    is an error naming the option and what to do."""
    model = ESMC_MODELS.get(model, model)
    path = Path(model).expanduser()
    if path.is_file():
        return Checkpoint(path, (path,))
    if path.is_dir():
        return _directory(path)
    if model in RELEASED_MODELS:
        released = released_checkpoint(model)
        if not released.is_file():
            raise EsmShardError(
                f"model: {model} is not downloaded yet (to {released}): 'python -m esmshard download {model}' does it"
            )
        return Checkpoint(released, (released,))
    if names_a_file(model):
        raise EsmShardError(f"model: {path} does not exist (a checkpoint file or model directory, by its name)")
    if not HUB_ID.fullmatch(model):
        raise EsmShardError(
            f"model: {model!r} is neither an existing checkpoint file or model directory, a Hugging Face hub "
            f"id (org/name) nor a released model ({', '.join([*RELEASED_MODELS, *ESMC_MODELS])})"
        )
    snapshot = hub_snapshot(model)
    if snapshot is None:
        raise EsmShardError(
            f"model: {model} is neither a directory nor in the Hugging Face cache {hub_cache()} (HF_HOME, "
            f"HF_HUB_CACHE){' and HF_HUB_OFFLINE forbids downloading it' if hub_offline() else ''}: download "
            f"it where there is network with 'python -m esmshard download {model}' (into that cache, or into a "
            f"directory given after it, to set 'model' to)"
        )
    try:
        return _directory(snapshot)
    except EsmShardError as error:
        raise EsmShardError(
            f"{error}; complete the cached copy of {model} with 'python -m esmshard download {model}'"
        ) from None


def _directory(path: Path) -> Checkpoint:
    """A Hugging Face model directory, or a snapshot of an ESM C repository (its weights file)."""
    weights = esmc_weights(path)
    return Checkpoint(weights, (weights,)) if weights else Checkpoint(path, model_files(path))


def esmc_weights(directory: Path) -> Path | None:
    """The weights file of a snapshot of an ESM C hub repository (no config.json; its state dict
    in data/weights/esmc_*.pth, as EvolutionaryScale's package reads it), or None."""
    if (directory / "config.json").exists():
        return None
    found = sorted((directory / "data" / "weights").glob("esmc_*.pth"))
    if len(found) > 1:
        raise EsmShardError(
            f"model: {directory} holds several ESM C weights files ({', '.join(p.name for p in found)})"
        )
    return found[0] if found else None


def names_a_file(model: str) -> bool:
    """Whether ``model`` can only be a path: absolute or relative to ., .. or ~, or ending as a
    weights file does (so a mistyped path, which also reads as a hub id org/name, is not looked
    for on the hub)."""
    return model.startswith(("/", "./", "../", "~")) or model.endswith((".pt", ".pth", ".bin", ".safetensors"))


def model_inputs(model: str) -> tuple[list[Path], bool]:
    """(the files that stand for ``model`` as an input of the jobs that read it, whether rule
    download_model must make them). A released model is its file in torch.hub's cache, and a hub
    id the cache's ``refs/main``: known before they are downloaded, and the same afterwards (a
    new revision of a hub model changes ``refs/main``). ESM C's released names are their hub ids."""
    model = ESMC_MODELS.get(model, model)
    path = Path(model).expanduser()
    if not path.exists() and model in RELEASED_MODELS and not released_checkpoint(model).is_file():
        return [released_checkpoint(model)], True
    if not path.exists() and HUB_ID.fullmatch(model) and not names_a_file(model):
        if hub_snapshot(model) is None and not hub_offline():
            return [hub_ref(model)], True
        resolve_model(model)  # offline, or a cached copy that must be whole: checked before any job
        return [hub_ref(model)], False
    return list(resolve_model(model).files), False


def checkpoint_stamp(checkpoint: Checkpoint) -> dict:
    """The files' total size and latest time: a file replaced or changed changes them."""
    stats = [os.stat(path) for path in checkpoint.files]
    return {"size": sum(stat.st_size for stat in stats), "mtime_ns": max(stat.st_mtime_ns for stat in stats)}


def model_digest(checkpoint: Checkpoint) -> str:
    """The identity of the numbers a model gives: its file's digest, or for several (a directory's
    config.json and weights) the digest of theirs, in order."""
    digests = [checkpoint_digest(path) for path in checkpoint.files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()[:32]


def identity_cache() -> Path:
    """Where checkpoint identities are kept for every run of this user: $ESMSHARD_CACHE, else
    esmshard/ in $XDG_CACHE_HOME (~/.cache)."""
    root = os.getenv("ESMSHARD_CACHE") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "esmshard")
    return Path(root).expanduser() / "checkpoint_identity"


def checkpoint_identity(checkpoint: Checkpoint, cache_dir: Path | None = None) -> dict:
    """What the plan records of a model: the digest of its files' content (its identity), its shape,
    size and time. Hashing a 3B checkpoint takes a second, 15B's six, so the identity is kept in
    ``cache_dir`` (default identity_cache()), one file per checkpoint, and reused by any run while
    the files' device, inode, size, modification and change times are unchanged (a file rewritten,
    replaced, or touched back to its old time has another change time). A cache that cannot be
    written only costs the hashing."""
    stats = [(str(Path(path).resolve()), os.stat(path)) for path in checkpoint.files]
    key = {
        "files": [
            [path, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns] for path, stat in stats
        ]
    }
    name = hashlib.sha256(json.dumps([path for path, _ in stats]).encode()).hexdigest()[:32]
    cache_path = (identity_cache() if cache_dir is None else Path(cache_dir)) / f"{name}.json"
    try:
        cached = json.loads(cache_path.read_text())
        if cached["key"] == key and _is_identity(cached["identity"]):
            return cached["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no entry, or a damaged one: hashed again, and the entry rewritten
    random_weights = False
    if checkpoint.location.is_dir():
        config = read_config(checkpoint.location)
        family, shape = config.family, Architecture(*config[:3])
    else:
        family, config = _checkpoint_config(checkpoint.location)
        shape = _architecture_of(config)
        random_weights = bool(getattr(config, RANDOM_WEIGHTS, False))
    identity = {
        "path": str(checkpoint.location.resolve()),
        "digest": model_digest(checkpoint),
        **checkpoint_stamp(checkpoint),
        "family": family,
        "num_layers": shape.layers,
        "embed_dim": shape.embed_dim,
        "random_weights": random_weights,
    }
    try:
        with atomic_output(cache_path) as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "identity": identity}, indent=2) + "\n")
    except OSError:
        pass
    return identity


# What checkpoint_identity records, and of which types.
_IDENTITY_FIELDS = {
    "path": str,
    "digest": str,
    "size": int,
    "mtime_ns": int,
    "family": str,
    "num_layers": int,
    "embed_dim": int,
    "random_weights": bool,
}
# The config entry that marks a checkpoint written by model.write_random_checkpoint.
RANDOM_WEIGHTS = "esmshard_random_weights"


def _is_identity(identity) -> bool:
    return isinstance(identity, dict) and all(
        isinstance(identity.get(field), kind) and (kind is bool or not isinstance(identity.get(field), bool))
        for field, kind in _IDENTITY_FIELDS.items()
    )


def checkpoint_digest(path, block_bytes: int = 64 << 20) -> str:
    """The checkpoint's content, as the identity of the numbers it gives (another file at the same
    path is another model; the same file touched or copied is the same): SHA-256 over the SHA-256
    of each 64 MiB block, hashed on several threads (a 650M checkpoint in ~0.3 s, not ~2 s)."""

    def block_digest(offset: int) -> bytes:
        with open(path, "rb") as handle:
            return hashlib.sha256(os.pread(handle.fileno(), block_bytes, offset)).digest()

    size = os.stat(path).st_size
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = b"".join(pool.map(block_digest, range(0, max(size, 1), block_bytes)))
    return hashlib.sha256(digests).hexdigest()[:32]


class _ConfigOnly(pickle.Unpickler):
    """Reads a torch checkpoint's pickle without torch and without its tensors: only the config
    classes fair-esm's files hold are made; tensors become their shapes, storages None."""

    def find_class(self, module, name):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *args, **kwargs: tuple(size)  # a tensor's shape
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *args, **kwargs: data
        if module == "torch._utils" and name.startswith("_rebuild_") or module == "torch" and name.endswith("Storage"):
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return None


def checkpoint_architecture(path) -> tuple[str, Architecture]:
    """A fair-esm checkpoint's family and shape, from its config."""
    family, config = _checkpoint_config(path)
    return family, _architecture_of(config)


def _architecture_of(config) -> Architecture:
    # ESM-2's cfg.model and ESM-1b's args name the shape alike
    return Architecture(config.encoder_layers, config.encoder_embed_dim, config.encoder_attention_heads)


def checkpoint_family(data: dict, path) -> tuple[str, object]:
    """(family, config) of a checkpoint's content: fair-esm's files as its loader tells them
    apart (``cfg.model`` is ESM-2's config, ``args`` of architecture roberta_large ESM-1b's), and
    ESM C's state dict, whose config (a namespace of fair-esm's names) is read from its tensors'
    shapes (in ``data``, tensors or their shapes)."""
    if "embed.weight" in data and "transformer.blocks.0.attn.layernorm_qkv.1.weight" in data:
        shape = lambda value: tuple(getattr(value, "shape", value))  # noqa: E731
        blocks = {int(name.split(".")[2]) for name in data if name.startswith("transformer.blocks.")}
        width = shape(data["embed.weight"])[1]
        config = argparse.Namespace(
            encoder_layers=max(blocks) + 1, encoder_embed_dim=width, encoder_attention_heads=width // ESMC_HEAD_DIM
        )
        setattr(config, RANDOM_WEIGHTS, RANDOM_WEIGHTS in data)
        return "esmc", config
    if isinstance(data.get("cfg"), dict) and "model" in data["cfg"]:
        return "esm2", data["cfg"]["model"]
    arch = getattr(data.get("args"), "arch", None)
    if arch == "roberta_large":
        return "esm1b", data["args"]
    raise EsmShardError(
        f"model: {path} is a fair-esm checkpoint of architecture {arch!r}, which esmshard does not run "
        f"(it runs ESM-2 and ESM-1b/ESM-1v, 'roberta_large')"
        if arch
        else f"model: {path} is not an ESM-2 or ESM-1b checkpoint (expected fair-esm's layout: cfg.model "
        f"or args, and model weights) nor an ESM C state dict"
    )


def _checkpoint_config(path):
    """(family, config) of a fair-esm checkpoint. Files in torch's zip format are read here
    without importing torch (~3 s), others by the safe loader of ``model.py``, which checks the
    file and says what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            [pickled] = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            with archive.open(pickled) as handle:
                family, config = checkpoint_family(_ConfigOnly(handle).load(), path)
        _architecture_of(config)  # a config without these is not fair-esm's: the loader says why
        return family, config
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError, KeyError, TypeError, AttributeError, EOFError):
        from esmshard.model import checkpoint_config

        return checkpoint_config(path)
