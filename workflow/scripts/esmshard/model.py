"""Loading ESM-2 checkpoints in fair-esm's file format, safely, with current torch.

fair-esm 2.0.0's own loader calls torch.load without weights_only (which fails on torch >= 2.6,
whose default is the safe unpickler) and insists on a contact-regression file next to a local
checkpoint. Here the checkpoint is read with the safe unpickler, allowing only the one non-tensor
type fair-esm checkpoints hold (argparse.Namespace, their config), checked to be ESM-2, and built
by fair-esm's own code. Contact regression weights are never needed for embeddings.
"""

import argparse
import contextlib
import logging
import os
import re
from pathlib import Path

import esm
import torch

from esmshard import EsmShardError, atomic_output
from esmshard.architectures import ESM2_MODELS, Architecture, checkpoint_file

log = logging.getLogger(__name__)

MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
URL_ENV = "ESMSHARD_MODEL_URL"  # another source ({name} is replaced), e.g. a mirror or a file:// URL
SAFE_GLOBALS = [argparse.Namespace]
_CHECKPOINT_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_CONTACT_REGRESSION = {"contact_head.regression.weight", "contact_head.regression.bias"}
_CONFIG_FIELDS = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")


def resolve_checkpoint(model: str) -> Path:
    """The local checkpoint file for a path, or for a released model name (downloaded once)."""
    path = checkpoint_file(model)
    if not path.is_file():
        download(model, path)
    return path


def download(model: str, path: Path) -> Path:
    """Download a released model to ``path``, published only once it is whole and loads."""
    url = os.environ.get(URL_ENV, MODEL_URL).format(name=model)
    log.info("downloading %s to %s", url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
        except Exception as error:  # any network or HTTP failure
            raise EsmShardError(
                f"model: cannot download {model} from {url} ({_one_line(error)}); download it where there is "
                f"network with 'python -m esmshard download {model} DIR' and set 'model' to the file's path"
            ) from None
        checked = architecture(tmp)
        if checked != ESM2_MODELS[model]:
            raise EsmShardError(f"model: {url} holds a model of shape {tuple(checked)}, not {model}")
    return path


def architecture(path) -> Architecture:
    """A checkpoint's shape, from its config (memory-mapped: no weights are read)."""
    config = _read_checkpoint(Path(path))["cfg"]["model"]
    return Architecture(config.encoder_layers, config.encoder_embed_dim, config.encoder_attention_heads)


def load_model(model: str):
    """(fair-esm ESM2 module in eval mode on the CPU, its Alphabet) for a name or a path.

    The module is fair-esm's ESM2, built without initialising its parameters and given the
    checkpoint's tensors (memory-mapped where the file allows), so no time or memory goes into a
    random initialisation that would be overwritten (its uninitialised tensors are never touched,
    so they take address space, not memory): this matters for the 3B and 15B models.
    """
    path = resolve_checkpoint(model)
    data = _read_checkpoint(path)
    config = data["cfg"]["model"]
    # fair-esm's names carry these prefixes in its checkpoints (see its _load_model_and_alphabet_core_v2)
    state = {_CHECKPOINT_PREFIX.sub("", name): tensor for name, tensor in data["model"].items()}
    with _without_initialisation():
        network = esm.ESM2(
            num_layers=config.encoder_layers,
            embed_dim=config.encoder_embed_dim,
            attention_heads=config.encoder_attention_heads,
            alphabet="ESM-1b",
            token_dropout=config.token_dropout,
        )
    expected = set(network.state_dict())
    missing = sorted(expected - set(state) - _CONTACT_REGRESSION)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise EsmShardError(
            f"model: {path} does not hold ESM-2 weights: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    try:
        network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # e.g. a tensor of the wrong shape for its config
        raise EsmShardError(f"model: {path} does not hold ESM-2 weights: {_one_line(error)}") from None
    # Released checkpoints keep the contact regression in a separate file; contacts are never
    # predicted here, so it gets zeros instead of being required.
    torch.nn.init.zeros_(network.contact_head.regression.weight)
    torch.nn.init.zeros_(network.contact_head.regression.bias)
    return network.eval(), network.alphabet


@contextlib.contextmanager
def _without_initialisation():
    """torch.nn.init's functions do nothing meanwhile (as transformers' no_init_weights). Not the
    meta device: its arithmetic goes through torch._refs, whose import is ~3 s of a rank's start-up."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "ones_", "zeros_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_checkpoint(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:  # memory-mapped: tensors are read when used, not all up front
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                data = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format
    except Exception as error:  # the safe unpickler raises many kinds on foreign files
        # PyTorch's own message advises loading unsafely: never pass that on; say what the file is not
        kind = "holds objects other than tensors and a config" if "weights_only" in str(error) else "is damaged or not a PyTorch file"
        raise EsmShardError(
            f"model: {path} is not a checkpoint in fair-esm's format that loads safely (it {kind}: "
            f"{type(error).__name__})"
        ) from None
    config = data.get("cfg", {}).get("model") if isinstance(data, dict) else None
    weights = data.get("model") if isinstance(data, dict) else None
    if (
        not isinstance(config, argparse.Namespace)
        or not all(hasattr(config, field) for field in _CONFIG_FIELDS)
        or not isinstance(weights, dict)
        or not any(key.endswith("embed_tokens.weight") for key in weights)
    ):
        raise EsmShardError(
            f"model: {path} is not an ESM-2 checkpoint (expected fair-esm's layout: "
            f"cfg.model with {', '.join(_CONFIG_FIELDS)}, and model weights)"
        )
    return data


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_random_checkpoint(path, layers: int, embed_dim: int, heads: int, seed: int = 0,
                            dtype: torch.dtype = torch.float32) -> Path:
    """Write an ESM-2 checkpoint with random weights in fair-esm's released file layout (the
    released files hold float16 weights: ``dtype``).

    For tests, the demo without network, and speed benchmarks: the architecture is real, the
    weights are not, so its embeddings mean nothing biologically.
    """
    torch.manual_seed(seed)
    network = esm.ESM2(num_layers=layers, embed_dim=embed_dim, attention_heads=heads, token_dropout=True)
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            if "layer_norm" in name:  # make LayerNorms non-trivial so tests see their effect
                tensor.add_(0.1 * torch.randn_like(tensor))
    weights = {}
    for name, tensor in network.state_dict().items():
        if name.startswith("contact_head."):
            continue  # released checkpoints keep these in a separate regression file
        prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
        weights[prefix + name] = tensor.to(dtype, copy=True)
    config = argparse.Namespace(
        encoder_layers=layers, encoder_embed_dim=embed_dim, encoder_attention_heads=heads, token_dropout=True
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": config}, "model": weights}, path)
    return path
