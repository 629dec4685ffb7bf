"""The released ESM-2 models: names, shapes and where their checkpoints live (no torch needed)."""

import json
import os
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
    from esmshard.model import architecture, checkpoint_digest  # torch: only when the file is new

    shape = architecture(path)
    identity = {"path": key["path"], "digest": checkpoint_digest(path), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "num_layers": shape.layers, "embed_dim": shape.embed_dim}
    with atomic_output(cache_path) as tmp:
        Path(tmp).write_text(json.dumps({"key": key, "identity": identity}, indent=2) + "\n")
    return identity
