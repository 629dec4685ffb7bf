"""ESM-2 and ESM-1b in Hugging Face's layout, read with the standard library alone (parse time needs it).

A model directory, as transformers' ``save_pretrained`` writes it, holds ``config.json`` and the
weights: ``model.safetensors`` or ``pytorch_model.bin``, or for large models a
``*.index.json`` naming its shards. The hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``) keeps
hub id ``org/name`` as ``models--org--name/snapshots/<commit>/`` (such a directory), with
``refs/main`` (``refs/<branch or tag>`` for ``org/name@<branch or tag>``) naming the commit it
downloaded last; ``org/name@<commit hash>`` is that snapshot itself.
"""

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

from esmshard import EsmShardError

# In order of preference: safetensors holds tensors only; .bin is a pickle (read by torch's
# weights-only loader). A *.index.json maps every tensor to one of the shards beside it.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# org/name, optionally @revision (a branch, a tag or a commit hash; default main)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# The vocabulary of fair-esm's ESM-1b alphabet, which ESM-2 and ESM-1b (and ESM-1v) share.
ESM_VOCABULARY = {"vocab_size": 33, "pad_token_id": 1, "mask_token_id": 32}
# Learned positions start after the padding index (fair-esm's LearnedPositionalEmbedding): 1024
# positions, the <cls> residues <eos> of up to 1022 residues, need 1026 rows.
ABSOLUTE_POSITIONS = 1026
# transformers' classes whose saved weights hold an ESM encoder, as config.json's
# "architectures" names them: the encoder itself, or it under "esm." with a task head beside it
# (fine-tuned models), which embeddings never use.
ESM_CLASSES = ("EsmModel", "EsmForMaskedLM", "EsmForSequenceClassification", "EsmForTokenClassification")


class EsmConfig(NamedTuple):
    """What the engine takes from a model's config (a config.json, or a fair-esm checkpoint's).
    ``family``: esm2 (rotary positions) or esm1b (learned positions, maybe a LayerNorm on the
    embeddings; ESM-1v's architecture too)."""

    layers: int
    embed_dim: int
    heads: int
    token_dropout: bool
    layer_norm_eps: float
    rope_theta: float
    family: str = "esm2"
    emb_layer_norm_before: bool = False
    max_positions: int = 1024  # learned positions (esm1b): <cls> residues <eos> of at most this many tokens


class ProtT5Config(NamedTuple):
    """What the engine takes from a T5 encoder's config.json (ProtT5)."""

    layers: int
    embed_dim: int  # d_model
    heads: int
    head_dim: int  # d_kv
    ffn_dim: int  # d_ff
    buckets: int  # relative_attention_num_buckets
    max_distance: int  # relative_attention_max_distance
    eps: float  # layer_norm_epsilon
    vocab_size: int
    family: str = "prott5"


# transformers' T5 classes whose weights hold ProtT5's encoder (a decoder beside it is not read).
T5_CLASSES = ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model")
PROTT5_VOCABULARY = 128  # ProtT5's spiece vocabulary, padded
# ProtT5's residue pieces ("▁A", ...) have token ids 3, 4, ... in this order (0-2: <pad>, </s>, <unk>).
PROTT5_RESIDUES = "ALGVSREDTIPKFQNYMHWCXBOUZ"


def hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded repositories (its rule, without importing it)."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    cache = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(cache)).expanduser()


def split_hub_id(model: str) -> tuple[str, str]:
    """(repository id, revision) of a hub id ``org/name[@revision]``; the revision defaults to main."""
    repo_id, _, revision = model.partition("@")
    return repo_id, revision or "main"


def _cached_repository(repo_id: str) -> Path:
    return hub_cache() / f"models--{repo_id.replace('/', '--')}"


def hub_ref(model: str) -> Path:
    """The file in the cache that says which snapshot a hub id ``org/name[@revision]`` is: for a
    branch or tag its ``refs/<revision>`` (rewritten by a download that finds it moved), for a
    commit hash the snapshot's own config.json (a commit never changes)."""
    repo_id, revision = split_hub_id(model)
    if _COMMIT.fullmatch(revision):
        return _cached_repository(repo_id) / "snapshots" / revision / "config.json"
    return _cached_repository(repo_id) / "refs" / revision


def hub_snapshot(model: str) -> Path | None:
    """The cached directory of a hub id ``org/name[@revision]``, or None when the cache has none."""
    repo_id, revision = split_hub_id(model)
    ref = hub_ref(model)
    if not ref.is_file():
        return None
    commit = revision if _COMMIT.fullmatch(revision) else ref.read_text().strip()
    return _cached_repository(repo_id) / "snapshots" / commit


def hub_offline() -> bool:
    """huggingface_hub's offline switch: then nothing may be downloaded."""
    flag = os.getenv("HF_HUB_OFFLINE") or os.getenv("TRANSFORMERS_OFFLINE") or ""
    return flag.upper() in {"1", "ON", "YES", "TRUE"}


def model_files(directory: Path) -> tuple[Path, ...]:
    """The files an ESM-2 model directory is made of: config.json, then the weights (an index
    and its shards), after checking that the config is one the engine runs."""
    read_config(directory)
    for name in WEIGHT_FILES:
        weights = directory / name
        if not weights.is_file():
            continue
        if not name.endswith(".index.json"):
            return directory / "config.json", weights
        try:
            shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            raise EsmShardError(f"model: {weights} is not a weights index (no weight_map)") from None
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise EsmShardError(f"model: {directory} lacks {', '.join(missing)}, named by {name}")
        return (directory / "config.json", weights, *(directory / shard for shard in shards))
    raise EsmShardError(
        f"model: {directory} has no weights file: expected {' or '.join(WEIGHT_FILES[::2])} "
        f"(or a sharded *.index.json), as transformers' save_pretrained writes them"
    )


def read_config(directory: Path) -> EsmConfig | ProtT5Config:
    """The directory's config.json, checked to describe an ESM-2, ESM-1b or ProtT5 that the engine runs."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        if (directory / "adapter_config.json").is_file():
            raise EsmShardError(
                f"model: {directory} holds a PEFT adapter (adapter_config.json), not a whole model: merge it "
                f"into its base model and save that, e.g. PeftModel.from_pretrained(base, DIRECTORY)"
                f".merge_and_unload().save_pretrained(NEW_DIRECTORY)"
            ) from None
        raise EsmShardError(
            f"model: {directory} is a directory without config.json: not a Hugging Face model directory"
        ) from None
    except (OSError, ValueError) as error:
        raise EsmShardError(f"model: {path} is not a readable JSON file ({error})") from None
    if isinstance(config, dict) and config.get("model_type") == "t5":
        return _prott5_config(directory, config)
    if not isinstance(config, dict) or config.get("model_type") != "esm":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise EsmShardError(
            f"model: {directory} holds a {kind or 'non-ESM'} model (config.json model_type {kind!r}), "
            f"not ESM-2 or ESM-1b ('esm') nor ProtT5 ('t5')"
        )
    problem = _unsupported(config)
    if problem:
        raise EsmShardError(f"model: {directory} is an ESM model that esmshard cannot run: {problem}")
    return EsmConfig(
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        bool(config.get("token_dropout")),
        float(config.get("layer_norm_eps", 1e-12)),
        float(config.get("rope_theta", 10000.0)),
        "esm2" if config.get("position_embedding_type", "absolute") == "rotary" else "esm1b",
        bool(config.get("emb_layer_norm_before")),
        config.get("max_position_embeddings", ABSOLUTE_POSITIONS) - config["pad_token_id"] - 1,
    )


def _unsupported(config: dict) -> str | None:
    """What in an ESM config.json (EsmConfig's defaults where a key is absent) the engine,
    fair-esm's ESM2 or ProteinBertModel (ESM-1b), does not have; None when it has everything."""
    if config.get("is_folding_model"):
        return "it is ESMFold (is_folding_model), not an ESM language model"
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not set(architectures) <= set(ESM_CLASSES):
        return (
            f"architectures {architectures!r}: esmshard reads the encoder of {', '.join(ESM_CLASSES)} "
            f"(for another class, save its ESM encoder alone: model.esm.save_pretrained(DIRECTORY))"
        )
    positions = config.get("position_embedding_type", "absolute")
    if positions not in ("rotary", "absolute"):
        return (
            f"position_embedding_type {positions!r}: the engine runs rotary positions (ESM-2's) and "
            f"absolute ones (ESM-1b's) only"
        )
    if positions == "absolute" and config.get("max_position_embeddings", 1026) < ABSOLUTE_POSITIONS:
        return (
            f"max_position_embeddings {config.get('max_position_embeddings')}: ESM-1b's learned positions "
            f"take {ABSOLUTE_POSITIONS} (1022 residues), which the engine's windows assume"
        )
    if config.get("token_dropout") is not None and not isinstance(config["token_dropout"], bool):
        return f"token_dropout {config['token_dropout']!r} is neither true nor false"
    if positions == "rotary" and config.get("emb_layer_norm_before"):
        return "emb_layer_norm_before with rotary positions (a LayerNorm on the embeddings is ESM-1b's): ESM-2 has none"
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return "is_decoder/add_cross_attention: ESM is a bidirectional encoder"
    vocabulary = {key: config.get(key) for key in ESM_VOCABULARY}
    if vocabulary != ESM_VOCABULARY:
        return f"its vocabulary {vocabulary} is not ESM's {ESM_VOCABULARY}"
    shape = [config.get(key) for key in ("num_hidden_layers", "hidden_size", "num_attention_heads")]
    if not all(isinstance(value, int) and value > 0 for value in shape) or shape[1] % shape[2]:
        return f"num_hidden_layers, hidden_size, num_attention_heads {shape} are not a transformer's"
    for key, default in (("layer_norm_eps", 1e-12), ("rope_theta", 10000.0)):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            return f"{key} {value!r} is not a positive number"
    if config.get("intermediate_size", 3072) != 4 * shape[1]:
        return f"intermediate_size {config.get('intermediate_size', 3072)}: ESM's is 4 x hidden_size"
    return None


def _prott5_config(directory: Path, config: dict) -> ProtT5Config:
    """A T5 config.json checked to be ProtT5's kind of encoder (T5 v1.0: ReLU, not gated; ProtT5's vocabulary)."""
    architectures = config.get("architectures") or []
    problem = None
    if not isinstance(architectures, list) or not set(architectures) <= set(T5_CLASSES):
        problem = f"architectures {architectures!r}: esmshard reads the encoder of {', '.join(T5_CLASSES)}"
    elif config.get("feed_forward_proj", "relu") != "relu":
        problem = f"feed_forward_proj {config.get('feed_forward_proj')!r}: ProtT5's encoder has a ReLU feed-forward"
    elif config.get("vocab_size") != PROTT5_VOCABULARY:
        problem = f"vocab_size {config.get('vocab_size')!r}: ProtT5's is {PROTT5_VOCABULARY}"
    fields = ("num_layers", "d_model", "num_heads", "d_kv", "d_ff")
    values = [config.get(key) for key in fields]
    if problem is None and not all(isinstance(value, int) and value > 0 for value in values):
        problem = f"{', '.join(fields)} {values} are not a transformer's"
    if problem is None:
        problem = _prott5_tokenizer_problem(directory / "tokenizer.json")
    if problem:
        raise EsmShardError(f"model: {directory} is a T5 model that esmshard cannot run as ProtT5: {problem}")
    return ProtT5Config(
        *values,
        int(config.get("relative_attention_num_buckets", 32)),
        int(config.get("relative_attention_max_distance", 128)),
        float(config.get("layer_norm_epsilon", 1e-6)),
        PROTT5_VOCABULARY,
    )


def _prott5_tokenizer_problem(path: Path) -> str | None:
    """What in a directory's tokenizer.json (where it has one, as transformers' save_pretrained
    writes it) gives ProtT5's residues other token ids than the engine's; None when nothing does."""
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text())["model"]["vocab"]
        ids = {entry[0]: i for i, entry in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is not a readable tokenizer (model.vocab)"
    for i, letter in enumerate(PROTT5_RESIDUES):
        if ids.get(f"▁{letter}") != 3 + i:
            return f"{path.name} gives the residue {letter} the token id {ids.get(f'▁{letter}')}, not ProtT5's {3 + i}"
    return None
