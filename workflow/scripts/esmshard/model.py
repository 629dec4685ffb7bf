"""Loading a model into its family's module, safely, with current torch: ESM-2 and ESM-1b (ESM-1v)
into fair-esm's own ESM2 and ProteinBertModel, ESM C into esmc.ESMC, ProtT5 into prott5.ProtT5;
from a fair-esm checkpoint, an ESM C state dict or a Hugging Face model directory; downloading
released and hub models.

fair-esm 2.0.0's own loader calls torch.load without weights_only (which fails on torch >= 2.6,
whose default is the safe unpickler) and insists on a contact-regression file next to a local
checkpoint. Here a checkpoint file is read with the safe unpickler, allowing only the one
non-tensor type fair-esm checkpoints hold (argparse.Namespace, their config), its family told
by its layout (architectures.checkpoint_family); a Hugging Face directory's weights are read from
safetensors (tensors only) or, failing that, pytorch_model.bin through the same safe unpickler,
and renamed to the module's names. Either way the module is the family's one, so every source
runs through the same engine. Contact regression, language-model and task-head weights (a
fine-tuned classifier's) are never needed for embeddings.
"""

import argparse
import contextlib
import json
import logging
import os
import re
from pathlib import Path

import esm
import torch

from esmshard import EsmShardError
from esmshard.architectures import (
    ESMC_MODELS,
    FAMILIES,
    RANDOM_WEIGHTS,
    RELEASED_MODELS,
    Checkpoint,
    checkpoint_architecture,
    checkpoint_family,
    esmc_weights,
    model_inputs,
    release_family,
    released_checkpoint,
    resolve_model,
)
from esmshard.esmc import ESMC
from esmshard.files import atomic_output
from esmshard.huggingface import HUB_ID, WEIGHT_FILES, EsmConfig, ProtT5Config, model_files, read_config, split_hub_id
from esmshard.packed import without_initialisation
from esmshard.prott5 import ProtT5

log = logging.getLogger(__name__)

MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
URL_ENV = "ESMSHARD_MODEL_URL"  # another source ({name} is replaced), e.g. a mirror or a file:// URL
SAFE_GLOBALS = [argparse.Namespace]
_CHECKPOINT_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
# What each family's config in a checkpoint must hold, and the name of its token embeddings.
_CONFIG_FIELDS = {
    "esm2": ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout"),
    "esm1b": ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "max_positions"),
    "esmc": ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads"),
}
_EMBEDDINGS = {"esm2": "embed_tokens.weight", "esm1b": "embed_tokens.weight", "esmc": "embed.weight"}
# Heads that embeddings never use: where a file lacks them (fair-esm keeps the contact regression
# in another file, transformers' EsmModel has no language-model head) they are zeros.
_UNUSED_HEADS = ("lm_head.", "contact_head.")
# ESM C's language-model head, which its released state dicts hold and its module here lacks.
_ESMC_HEAD = "sequence_head."
# transformers' ESM names (without the "esm." prefix of EsmForMaskedLM) to fair-esm's ESM2 names,
# each rule applied in turn; LayerNorm gamma/beta are the old names transformers still writes.
_HF_NAMES = [
    (re.compile(pattern), name)
    for pattern, name in (
        (r"^embeddings\.word_embeddings\.", "embed_tokens."),
        (r"^embeddings\.position_embeddings\.", "embed_positions."),
        (r"^embeddings\.layer_norm\.", "emb_layer_norm_before."),
        (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
        (r"^encoder\.layer\.(\d+)\.LayerNorm\.", r"layers.\1.final_layer_norm."),
        (r"^encoder\.emb_layer_norm_after\.", "emb_layer_norm_after."),
        (r"^lm_head\.decoder\.weight$", "lm_head.weight"),
        (r"\.gamma$", ".weight"),
        (r"\.beta$", ".bias"),
    )
]
# Not weights of the module: rotary frequencies (taken apart, below), position ids.
_HF_NOT_WEIGHTS = re.compile(r"rotary_embeddings\.inv_freq$|position_ids$")
# Task heads that transformers' ESM classes add and fair-esm's ESM2 has no place for (it has an
# lm_head and a contact_head): the classifier of EsmForSequenceClassification and
# EsmForTokenClassification (a fine-tuned model), EsmModel's pooler. Embeddings are the encoder's
# outputs, before any head, so these weights are left unread.
_HF_TASK_HEADS = ("classifier.", "pooler.")


def resolve_checkpoint(model: str) -> Checkpoint:
    """The model ``model`` names on disk, downloaded first (once) if it is a released name or a
    hub id that is missing."""
    if model_inputs(model)[1]:  # missing from its cache
        download(model)
    return resolve_model(model)


def download(model: str, target: Path | None = None) -> Path:
    """Download a released model or a hub id, checked to be the model named before it lands, to
    ``target`` (a released model's file; a hub model's directory), by default where the workflow
    looks (torch.hub's cache; the Hugging Face cache). Returns where it landed."""
    model = ESMC_MODELS.get(model, model)
    if model in RELEASED_MODELS:
        return _download_released(model, Path(target) if target else released_checkpoint(model))
    if not HUB_ID.fullmatch(model):
        raise EsmShardError(
            f"model: {model!r} is neither a released model ({', '.join(RELEASED_MODELS)}) "
            f"nor a Hugging Face hub id (org/name)"
        )
    return _download_from_hub(model, target)


def _download_released(model: str, path: Path) -> Path:
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
        family, shape = checkpoint_architecture(tmp)
        if (family, shape) != (release_family(model), RELEASED_MODELS[model]):
            raise EsmShardError(f"model: {url} holds an {FAMILIES[family]} model of shape {tuple(shape)}, not {model}")
    return path


def _download_from_hub(model: str, directory: Path | None) -> Path:
    """The hub model's config first (an ESM model that the engine runs?), then its weights: safetensors
    where the repository has them, else pytorch_model.bin (never both: a 3B model is 11 GB).
    ``model``: org/name[@revision]."""
    import huggingface_hub  # only here: nothing else needs it

    repo_id, revision = split_hub_id(model)
    where = {"local_dir": str(directory)} if directory else {}
    where["revision"] = revision
    log.info("downloading %s from the Hugging Face hub into %s", model, directory or "the Hugging Face cache")
    try:
        if repo_id in ESMC_MODELS.values():  # a state dict, no config.json: checked once it is here
            snapshot = Path(
                huggingface_hub.snapshot_download(repo_id, allow_patterns=["data/weights/esmc_*.pth"], **where)
            )
            weights = esmc_weights(snapshot)
            if weights is None or checkpoint_architecture(weights)[0] != "esmc":
                raise EsmShardError(
                    f"model: {model} on the Hugging Face hub holds no ESM C weights (data/weights/esmc_*.pth)"
                )
            return snapshot
        config = Path(huggingface_hub.hf_hub_download(repo_id, "config.json", **where))
        read_config(config.parent)
        for patterns in (["model.safetensors*", "model-*.safetensors"], ["pytorch_model*.bin*"]):
            snapshot = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, **where))
            if any((snapshot / name).is_file() for name in WEIGHT_FILES):
                break
    except EsmShardError:
        raise
    except Exception as error:  # network, offline mode, unknown or private repository
        raise EsmShardError(
            f"model: cannot download {model} from the Hugging Face hub ({_one_line(error)}); download it where "
            f"there is network with 'python -m esmshard download {model}' (into the Hugging Face cache, or "
            f"a directory given after it, to set 'model' to)"
        ) from None
    model_files(snapshot)  # whole: config.json and the weights
    return snapshot


def checkpoint_config(path):
    """(family, config) of a fair-esm checkpoint (memory-mapped: no weights are read)."""
    return _read_checkpoint(Path(path))[:2]


def load_model(model: str):
    """(the family's module in eval mode on the CPU, its alphabet) for any model ``model`` names: a
    released name, a checkpoint file, a Hugging Face directory or hub id (see build_module).

    The module is built without initialising its parameters and given the file's tensors
    (memory-mapped where the file allows), so no time or memory goes into a random
    initialisation that would be overwritten (its uninitialised tensors are never touched, so
    they take address space, not memory): this matters for the 3B and 15B models.
    """
    checkpoint = resolve_checkpoint(model)
    if checkpoint.location.is_dir():
        config = read_config(checkpoint.location)
        hf_state = _prott5_state if config.family == "prott5" else _hf_state
        state, names_in_file = hf_state(checkpoint, config)
    else:
        family, saved, weights = _read_checkpoint(checkpoint.location)
        # fair-esm's LayerNorm eps and rotary base, which its checkpoints do not record
        config = EsmConfig(
            saved.encoder_layers,
            saved.encoder_embed_dim,
            saved.encoder_attention_heads,
            bool(getattr(saved, "token_dropout", False)),
            1e-5,
            10000.0,
            family,
            any(name.endswith("emb_layer_norm_before.weight") for name in weights),
            getattr(saved, "max_positions", 1024),
        )
        # fair-esm's names carry these prefixes in its checkpoints (see its _load_model_and_alphabet_core_v1/v2)
        names_in_file = {_CHECKPOINT_PREFIX.sub("", name): name for name in weights if not name.startswith(_ESMC_HEAD)}
        state = {name: weights[name_in_file] for name, name_in_file in names_in_file.items()}
    if config.family == "esm1b" and "embed_tokens.weight" in state:
        # fair-esm zeroes ESM-1b's mask embedding when it loads it (token dropout)
        state["embed_tokens.weight"] = state["embed_tokens.weight"].clone()
        state["embed_tokens.weight"][esm.Alphabet.from_architecture("ESM-1b").mask_idx] = 0
    network = _module_with(config, state, names_in_file, checkpoint.location)
    return network.eval(), network.alphabet


def build_module(config: EsmConfig, initialised: bool = False):
    """The module of ``config``'s family and shape (fair-esm's ESM2 or ProteinBertModel, or
    esmc.ESMC), its parameters uninitialised unless ``initialised`` (then as its code
    initialises them)."""
    alphabet = esm.Alphabet.from_architecture("ESM-1b")  # ESM-2's and ESM-1b's
    with contextlib.nullcontext() if initialised else without_initialisation():
        if config.family == "esmc":
            return ESMC(config.embed_dim, config.heads, config.layers)
        if config.family == "prott5":
            return ProtT5(config)
        if config.family == "esm2":
            return esm.ESM2(
                num_layers=config.layers,
                embed_dim=config.embed_dim,
                attention_heads=config.heads,
                alphabet=alphabet,
                token_dropout=config.token_dropout,
            )
        args = argparse.Namespace(
            arch="roberta_large",
            layers=config.layers,
            embed_dim=config.embed_dim,
            ffn_embed_dim=4 * config.embed_dim,
            attention_heads=config.heads,
            max_positions=config.max_positions,
            emb_layer_norm_before=config.emb_layer_norm_before,
            token_dropout=config.token_dropout,
        )
        network = esm.ProteinBertModel(args, alphabet)
        network.alphabet = alphabet  # as ESM2 keeps it
        return network


def _module_with(config: EsmConfig, state: dict, names_in_file: dict, location: Path):
    """fair-esm's module of this config holding these tensors (by its names; ``names_in_file``
    gives each one's name in ``location``, which an error about an unexpected one says), on the CPU."""
    network = build_module(config)
    for module in network.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = config.layer_norm_eps  # the config's (fair-esm's own is torch's default, 1e-5)
    kind = FAMILIES[config.family]
    expected = set(network.state_dict())
    missing = sorted(name for name in expected - set(state) if not name.startswith(_UNUSED_HEADS))
    unexpected = sorted(names_in_file[name] for name in set(state) - expected)
    if missing or unexpected:
        raise EsmShardError(
            f"model: {location} does not hold {kind} weights: missing {_few(missing)}"
            f"{' (by fair-esm names)' if missing else ''}, unexpected {_few(unexpected)}"
        )
    try:
        network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as error:  # e.g. a tensor of the wrong shape for its config
        raise EsmShardError(f"model: {location} does not hold {kind} weights: {_one_line(error)}") from None
    with torch.no_grad():
        for name in expected - set(state):  # a head the file lacks (nothing else, checked above)
            network.get_parameter(name).zero_()
    if config.family == "esm1b":
        network.lm_head.weight = network.embed_tokens.weight  # tied, as fair-esm builds it
    return network


def _hf_state(checkpoint: Checkpoint, config: EsmConfig) -> tuple[dict, dict]:
    """A Hugging Face directory's tensors under fair-esm's names, and each one's name in the
    directory. Task heads' weights are left out (and logged)."""
    tensors = _hf_tensors(checkpoint)
    state, names_in_file, heads, inv_freq = {}, {}, [], None
    for name_in_file, tensor in tensors.items():
        name = name_in_file.removeprefix("esm.")
        if name.endswith("rotary_embeddings.inv_freq"):
            inv_freq = tensor  # one for all layers (per layer in older files, all equal)
        if _HF_NOT_WEIGHTS.search(name):
            continue
        if name.startswith(_HF_TASK_HEADS):
            heads.append(name_in_file)
            continue
        for pattern, replacement in _HF_NAMES:
            name = pattern.sub(replacement, name)
        state[name], names_in_file[name] = tensor, name_in_file
    if heads:
        log.info(
            "model: %s: ignored %d weights of a task head (%s): embeddings are the encoder's outputs, before any head",
            checkpoint.location,
            len(heads),
            _few(sorted(heads), limit=8),
        )
    if "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, as in fair-esm's modules
    if config.family == "esm1b":
        return state, names_in_file
    if inv_freq is None:  # what transformers computes from the config when the file has none
        head_dim = config.embed_dim // config.heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    for layer in range(config.layers):
        state[f"layers.{layer}.self_attn.rot_emb.inv_freq"] = inv_freq.float()
    return state, names_in_file


def _prott5_state(checkpoint: Checkpoint, config) -> tuple[dict, dict]:
    """A T5 directory's encoder tensors (``shared`` and ``encoder.*``; a decoder and its head
    are not read), and each one's name in the directory."""
    tensors = _hf_tensors(checkpoint)
    state = {name: t for name, t in tensors.items() if name == "shared.weight" or name.startswith("encoder.")}
    embedding = state.pop("encoder.embed_tokens.weight", None)  # tied to shared
    if "shared.weight" not in state and embedding is not None:
        state["shared.weight"] = embedding
    return state, {name: name for name in state}


def _hf_tensors(checkpoint: Checkpoint) -> dict:
    """Every tensor of a Hugging Face directory's weights files, by its name there."""
    tensors = {}
    for path in checkpoint.files[1:]:
        if not path.name.endswith(".index.json"):
            tensors.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_weights(path))
    return tensors


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as error:  # a damaged or foreign file
        raise EsmShardError(f"model: {path} is not a readable safetensors file ({_one_line(error)})") from None


def _read_weights(path: Path) -> dict:
    data = _torch_load(path, "PyTorch weights file")
    if not isinstance(data, dict) or not all(isinstance(value, torch.Tensor) for value in data.values()):
        raise EsmShardError(f"model: {path} is not a PyTorch weights file (a dict of tensors)")
    return data


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_checkpoint(path: Path) -> tuple[str, object, dict]:
    """(family, config, weights by their names in the file) of a fair-esm checkpoint or an ESM C
    state dict."""
    data = _torch_load(path, "checkpoint in fair-esm's format or an ESM C state dict")
    if not isinstance(data, dict):
        raise EsmShardError(f"model: {path} is not an ESM-2 or ESM-1b checkpoint (expected fair-esm's layout)")
    family, config = checkpoint_family(data, path)
    weights = {k: v for k, v in data.items() if k != RANDOM_WEIGHTS} if family == "esmc" else data.get("model")
    fields = _CONFIG_FIELDS[family]
    if (
        not isinstance(config, argparse.Namespace)
        or not all(hasattr(config, field) for field in fields)
        or not isinstance(weights, dict)
        or not any(key.endswith(_EMBEDDINGS[family]) for key in weights)
    ):
        raise EsmShardError(
            f"model: {path} is not an {FAMILIES[family]} checkpoint (expected fair-esm's layout: "
            f"{'cfg.model' if family == 'esm2' else 'args'} with {', '.join(fields)}, and model weights)"
        )
    return family, config, weights


def _torch_load(path: Path, kind: str):
    """A torch file's content through the weights-only unpickler (tensors, containers and
    fair-esm's config only), memory-mapped where the file allows."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:  # memory-mapped: tensors are read when used, not all up front
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format
    except Exception as error:  # the safe unpickler raises many kinds on foreign files
        # PyTorch's own message advises loading unsafely: never pass that on; say what the file is not
        what = (
            "holds objects other than tensors and a config"
            if "weights_only" in str(error)
            else "is damaged or not a PyTorch file"
        )
        raise EsmShardError(
            f"model: {path} is not a {kind} that loads safely (it {what}: {type(error).__name__})"
        ) from None


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_random_checkpoint(
    path,
    layers: int,
    embed_dim: int,
    heads: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    family: str = "esm2",
) -> Path:
    """Write a checkpoint of ``family`` with random weights in its released file layout: esm2 and
    esm1b (ESM-1b's and ESM-1v's architecture, with its LayerNorm on the embeddings) as fair-esm's
    files (which hold float16 weights: ``dtype``), esmc as EvolutionaryScale's state dict (its
    heads of 64: ``heads`` must be embed_dim / 64), prott5 as a Hugging Face T5 encoder directory
    at ``path`` (ProtT5-XL's proportions: heads of 4 x embed_dim / heads, a feed-forward 16 x
    embed_dim wide).

    For tests, the demo without network, and speed benchmarks: the architecture is real, the
    weights are not, so its embeddings mean nothing biologically. ``device`` draws them (a GPU
    draws 15B's in seconds, and the host then holds only the file's copy).
    """
    torch.manual_seed(seed)
    if family == "prott5":
        return _write_random_prott5(Path(path), layers, embed_dim, heads, dtype, device)
    shape = EsmConfig(layers, embed_dim, heads, family != "esmc", 1e-5, 10000.0, family, emb_layer_norm_before=True)
    with torch.device(device):
        network = build_module(shape, initialised=True)
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            # make LayerNorms non-trivial so tests see their effect (ESM C's 1-D tensors are all LayerNorms')
            if "layer_norm" in name or family == "esmc" and tensor.dim() == 1:
                tensor.add_(0.1 * torch.randn_like(tensor))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if family == "esmc":
        weights = {name: tensor.to("cpu", dtype, copy=True) for name, tensor in network.state_dict().items()}
        torch.save({**weights, RANDOM_WEIGHTS: torch.tensor(True)}, path)  # said in the plan's log, the manifest
        return path
    if family == "esm2":
        config = argparse.Namespace(
            encoder_layers=layers, encoder_embed_dim=embed_dim, encoder_attention_heads=heads, token_dropout=True
        )
    else:  # the fairseq arguments of fair-esm's ESM-1b files that its loader reads
        config = argparse.Namespace(
            arch="roberta_large",
            encoder_layers=layers,
            encoder_embed_dim=embed_dim,
            encoder_ffn_embed_dim=4 * embed_dim,
            encoder_attention_heads=heads,
            max_positions=1024,
            token_dropout=True,
        )
    setattr(config, RANDOM_WEIGHTS, True)  # said in the plan's log, the manifest and the report
    weights = {}
    for name, tensor in network.state_dict().items():
        if name.startswith("contact_head."):
            continue  # released checkpoints keep these in a separate regression file
        prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
        weights[prefix + name] = tensor.to("cpu", dtype, copy=True)
    key = {"esm2": "cfg", "esm1b": "args"}[family]
    torch.save({key: {"model": config} if family == "esm2" else config, "model": weights}, path)
    return path


def _write_random_prott5(directory: Path, layers: int, embed_dim: int, heads: int, dtype, device) -> Path:
    """A T5 encoder of ProtT5's kind with random weights, as transformers' save_pretrained lays it out."""
    from safetensors.torch import save_file

    config = ProtT5Config(layers, embed_dim, heads, 4 * embed_dim // heads, 16 * embed_dim, 32, 128, 1e-6, 128)
    with torch.device(device):
        network = build_module(config, initialised=True)
    with torch.no_grad():
        for name, tensor in network.named_parameters():
            if "layer_norm" in name:
                tensor.add_(0.1 * torch.randn_like(tensor))
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: t.to("cpu", dtype).contiguous() for name, t in network.state_dict().items()}
    save_file(weights, directory / "model.safetensors")
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "t5",
                "architectures": ["T5EncoderModel"],
                "num_layers": layers,
                "d_model": embed_dim,
                "num_heads": heads,
                "d_kv": config.head_dim,
                "d_ff": config.ffn_dim,
                "relative_attention_num_buckets": config.buckets,
                "relative_attention_max_distance": config.max_distance,
                "layer_norm_epsilon": config.eps,
                "feed_forward_proj": "relu",
                "vocab_size": config.vocab_size,
            },
            indent=2,
        )
    )
    return directory
