"""ProtT5 (Rostlab: prot_t5_xl_uniref50, prot_t5_xl_half_uniref50-enc): the encoder of T5 as
transformers' T5EncoderModel computes it, under its parameter names (so a Hugging Face
directory's weights load as they are), without transformers.

Tokens are residues then </s>, no BOS; Rostlab's scripts map the rare residues U, Z, O and B to
X, and so does ``Vocabulary``. Per block, with D = d_model, H heads of d_kv (H x d_kv need not be
D) and F = d_ff:

    x = x + o(attention(q(rms(x)), k(rms(x)), v(rms(x))) + bias)   (no 1/sqrt(d_kv) scaling)
    x = x + wo(relu(wi(rms(x))))

rms: T5's LayerNorm (no mean subtracted, no bias); bias: the first block's relative position
bias [H, L, L], from the key's offset to the query in T5's log-spaced buckets, shared by every
block. A final rms gives the last layer. ``hidden_states`` yields fair-esm's layer numbering
(0: the embeddings; n: after block n, the last after the final rms), as transformers'
``hidden_states`` tuple is.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from esmshard.huggingface import PROTT5_RESIDUES, ProtT5Config

PAD, EOS, UNK = 0, 1, 2
# ProtT5's vocabulary (its spiece.model's pieces "▁A" ... ), the same in both released models;
# a directory's tokenizer.json is checked against it (huggingface._prott5_tokenizer_problem).
TOKENS = {letter: 3 + i for i, letter in enumerate(PROTT5_RESIDUES)}
RARE = "UZOB"  # embedded as X, as Rostlab's scripts do


class Vocabulary:
    """What the engines' packer reads of an alphabet: ProtT5's token ids, no BOS."""

    prepend_bos = False
    padding_idx, eos_idx, unk_idx, cls_idx = PAD, EOS, UNK, None

    def get_idx(self, letter: str) -> int:
        return TOKENS.get("X" if letter in RARE else letter, UNK)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        x = x.float()
        # in float32, rounded once to the weight's dtype (transformers rounds before the product too)
        return (self.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))).to(
            self.weight.dtype
        )


class SelfAttention(nn.Module):
    def __init__(self, config: ProtT5Config, has_bias: bool):
        super().__init__()
        inner = config.heads * config.head_dim
        self.q, self.k, self.v = (nn.Linear(config.embed_dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, config.embed_dim, bias=False)
        self.heads, self.config = config.heads, config
        if has_bias:
            self.relative_attention_bias = nn.Embedding(config.buckets, config.heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """[1, H, L, L] float32: bias[h, i, j] for the key j seen from the query i."""
        position = torch.arange(length, device=device)
        buckets = relative_buckets(position[None, :] - position[:, None], self.config.buckets, self.config.max_distance)
        return self.relative_attention_bias(buckets).float().permute(2, 0, 1)[None]

    def forward(self, x, mask):
        # x: [B, L, D]; mask: [B, H, L, L] additive (position bias, padding keys at the dtype's minimum)
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # [B, H, L, d]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # [B, H, L, d]
        return self.o(attended.transpose(1, 2).reshape(B, L, -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: ProtT5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(config, has_bias)
        self.layer_norm = RMSNorm(config.embed_dim, config.eps)


class DenseReluDense(nn.Module):
    def __init__(self, config: ProtT5Config):
        super().__init__()
        self.wi = nn.Linear(config.embed_dim, config.ffn_dim, bias=False)
        self.wo = nn.Linear(config.ffn_dim, config.embed_dim, bias=False)

    def forward(self, x):
        hidden = F.relu(self.wi(x))  # [B, L, F] in the weights' dtype
        if hidden.is_cuda and hidden.dtype != torch.float32 and self.wo.weight.dtype == hidden.dtype:
            # T5 overflows float16 in this product's output, so it comes out in float32: cuBLAS's
            # half-precision product with float32 accumulation and output, at half precision's
            # speed (transformers keeps wo in float32 and multiplies in float32, several times slower)
            B, L, _ = hidden.shape
            return torch.mm(hidden.view(B * L, -1), self.wo.weight.t(), out_dtype=torch.float32).view(B, L, -1)
        return self.wo(hidden.to(self.wo.weight.dtype))  # wo may be kept in float32


class FeedForwardLayer(nn.Module):
    def __init__(self, config: ProtT5Config):
        super().__init__()
        self.DenseReluDense = DenseReluDense(config)
        self.layer_norm = RMSNorm(config.embed_dim, config.eps)


class Block(nn.Module):
    def __init__(self, config: ProtT5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(config, has_bias), FeedForwardLayer(config)])

    def forward(self, x, mask):
        attention, ffn = self.layer
        x = x + attention.SelfAttention(attention.layer_norm(x), mask)
        return x + ffn.DenseReluDense(ffn.layer_norm(x))


class Encoder(nn.Module):
    def __init__(self, config: ProtT5Config):
        super().__init__()
        self.block = nn.ModuleList(Block(config, has_bias=i == 0) for i in range(config.layers))
        self.final_layer_norm = RMSNorm(config.embed_dim, config.eps)


class ProtT5(nn.Module):
    def __init__(self, config: ProtT5Config):
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.embed_dim)
        self.encoder = Encoder(config)
        self.alphabet = Vocabulary()
        self.config, self.num_layers, self.heads = config, config.layers, config.heads

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.shared  # the name the engines read the width from

    def hidden_states(self, tokens, layers):
        """Yields (layer, [B, L, D]) for each of ``layers`` (increasing), from padded ``tokens`` [B, L]."""
        B, L = tokens.shape
        x = self.shared(tokens)  # [B, L, D]
        attention = self.encoder.block[0].layer[0].SelfAttention
        bias = attention.position_bias(L, tokens.device)  # [1, H, L, L]
        padding = (tokens == PAD)[:, None, None, :]  # [B, 1, 1, L]
        dtype = attention.q.weight.dtype  # the attention's (the residual stream may be wider)
        mask = bias.to(dtype).masked_fill(padding, torch.finfo(dtype).min)  # [B, H, L, L]
        if 0 in layers:
            yield 0, x
        for number, block in enumerate(self.encoder.block[: max(layers)], start=1):
            x = block(x, mask)
            if number in layers:
                yield number, self.encoder.final_layer_norm(x) if number == self.num_layers else x

    def forward(self, tokens, repr_layers=()):
        """fair-esm's interface, which the reference engine reads: {"representations": {layer: [B, L, D]}}."""
        return {"representations": dict(self.hidden_states(tokens, set(repr_layers)))} if repr_layers else {}


def relative_buckets(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets of key-minus-query offsets: half the buckets per direction, exact
    for the nearest half of those, log-spaced up to ``max_distance`` beyond."""
    half = buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, far.clamp(max=half - 1))
