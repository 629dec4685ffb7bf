"""The released ESM-2 models: names, shapes and where their checkpoints live (no torch needed)."""

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

from esmshard import EsmShardError, atomic_output


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

# ESM-2 was trained on at most 1022 residues plus the BOS and EOS tokens.
MAX_RESIDUES = 1022


def released_checkpoint(name: str) -> Path:
    """Where torch.hub (and so fair-esm) keeps a released model's checkpoint: a model downloaded
    before, by fair-esm or by esmshard, is found there (torch.hub.get_dir's rule, without torch)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(torch_home).expanduser() / "hub" / "checkpoints" / f"{name}.pt"


def checkpoint_file(model: str) -> Path:
    """The file ``model`` stands for: an existing path as given (``~`` expanded), or where a
    released model is kept (downloaded or not yet); anything else is an error naming the option."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if model in ESM2_MODELS:
        return released_checkpoint(model)
    raise EsmShardError(
        f"model: {model!r} is neither an existing checkpoint file nor a released ESM-2 model "
        f"({', '.join(ESM2_MODELS)})"
    )


def checkpoint_identity(path, cache_path) -> dict:
    """What the plan records of a checkpoint: the digest of its content (its identity), its shape,
    size and time. Kept in ``cache_path`` and reused while the file's size, time and inode are
    unchanged: hashing a 3B checkpoint takes ~10 s, and reading its config means importing torch."""
    stat = os.stat(path)
    key = {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "inode": stat.st_ino}
    try:
        cached = json.loads(Path(cache_path).read_text())
        if cached["key"] == key:
            return cached["identity"]
    except (OSError, ValueError, KeyError):
        pass
    shape = checkpoint_architecture(path)
    identity = {"path": key["path"], "digest": checkpoint_digest(path), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "num_layers": shape.layers, "embed_dim": shape.embed_dim}
    with atomic_output(cache_path) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "identity": identity}, indent=2) + "\n")
    return identity


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
    classes fair-esm's files hold are made; tensors and storages become None."""

    def find_class(self, module, name):
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name.startswith("_rebuild_") or module == "torch" and name.endswith("Storage"):
            return lambda *args, **kwargs: None
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        return None


def checkpoint_architecture(path) -> Architecture:
    """A fair-esm checkpoint's shape from its config. Files in torch's zip format are read here
    without importing torch (~3 s), others by the safe loader of ``model.py``."""
    try:
        with zipfile.ZipFile(path) as archive:
            [pickled] = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            with archive.open(pickled) as handle:
                config = _ConfigOnly(handle).load()["cfg"]["model"]
        return Architecture(config.encoder_layers, config.encoder_embed_dim, config.encoder_attention_heads)
    except (zipfile.BadZipFile, ValueError, pickle.UnpicklingError, KeyError, TypeError, AttributeError, EOFError):
        from esmshard.model import architecture  # checks the file and says what is wrong with it

        return architecture(path)
