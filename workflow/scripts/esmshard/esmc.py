"""ESM C (EvolutionaryScale, 2024: esmc_300m, esmc_600m) as a module of its own, without
EvolutionaryScale's ``esm`` package (whose top-level module is named like fair-esm's).

The function and the parameter names are those of that package's ``esm.models.esmc.ESMC``, so
its released state dicts (``esmc_300m_2024_12_v0.pth``) load as they are: token embeddings
(no scaling, no token dropout), then per block, with D = d_model, H = heads, d = D / H = 64:

    x = x + attention(x) / s,   s = sqrt(layers / 36)
    x = x + swiglu_ffn(x) / s

attention: LayerNorm (with bias), one bias-free projection to q, k, v [.., 3D], LayerNorms
without bias on q and on k over all D, rotary positions (base 10000, halves rotated) per head,
softmax(q k^T / sqrt(d)) v, a bias-free output projection; swiglu_ffn: LayerNorm (with bias),
a bias-free projection to 2F (F = 8/3 D rounded up to a multiple of 256), silu(first half) x
second half, a bias-free projection back. A final LayerNorm without bias gives the last layer.
``forward`` takes padded tokens and returns fair-esm's ``{"representations": {layer: [B, L, D]}}``
(layer 0: the embeddings; n: after block n; the last one after the final LayerNorm), which the
reference engine reads; ``packed.PackedESMC`` runs the same function on packed streams.
"""

import math

import esm
import torch
import torch.nn.functional as F
from torch import nn

VOCABULARY = 64  # rows of the embedding: ESM C's 33 tokens (those of fair-esm's ESM-1b alphabet), padded


def ffn_width(d_model: int) -> int:
    """EvolutionaryScale's swiglu_correction_fn: 8/3 of the width, rounded up to a multiple of 256."""
    return int(((8 / 3 * d_model) + 255) // 256 * 256)


class Attention(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 3 * d_model, bias=False))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.q_ln = nn.LayerNorm(d_model, bias=False)
        self.k_ln = nn.LayerNorm(d_model, bias=False)

    def forward(self, x, cos, sin, key_padding):
        # x: [B, L, D]; cos, sin: [L, d]; key_padding: [B, L] True at padding
        B, L, D = x.shape
        q, k, v = self.layernorm_qkv(x).chunk(3, dim=-1)  # 3 x [B, L, D]
        q, k = self.q_ln(q), self.k_ln(k)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, d]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        attended = F.scaled_dot_product_attention(q, k, v, ~key_padding[:, None, None, :])  # [B, H, L, d]
        return self.out_proj(attended.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, scale: float):
        super().__init__()
        self.attn = Attention(d_model, heads)
        hidden = ffn_width(d_model)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, 2 * hidden, bias=False),
            SwiGLU(),
            nn.Linear(hidden, d_model, bias=False),
        )
        self.scale = scale

    def forward(self, x, cos, sin, key_padding):
        x = x + self.attn(x, cos, sin, key_padding) / self.scale
        return x + self.ffn(x) / self.scale


class SwiGLU(nn.Module):
    def forward(self, x):
        gate, value = x.chunk(2, dim=-1)
        return F.silu(gate) * value


class Transformer(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int):
        super().__init__()
        scale = math.sqrt(layers / 36)
        self.blocks = nn.ModuleList(Block(d_model, heads, scale) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model, bias=False)


class ESMC(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, d_model)
        self.transformer = Transformer(d_model, heads, layers)
        self.alphabet = esm.Alphabet.from_architecture("ESM-1b")  # ESM C's token ids for every token used here
        self.padding_idx = self.alphabet.padding_idx
        self.num_layers = layers
        self.heads = heads
        head_dim = d_model // heads
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d / 2]

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.embed  # the name the engines read the width from

    def forward(self, tokens, repr_layers=()):
        """tokens: [B, L] (<cls> residues <eos>, then padding); returns {"representations": {layer: [B, L, D]}}."""
        key_padding = tokens == self.padding_idx  # [B, L]
        x = self.embed(tokens)  # [B, L, D]
        angles = torch.arange(tokens.shape[1], device=tokens.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # [L, d]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        representations = {0: x} if 0 in repr_layers else {}
        for number, block in enumerate(self.transformer.blocks, start=1):
            x = block(x, cos, sin, key_padding)
            if number in repr_layers:
                representations[number] = self.transformer.norm(x) if number == self.num_layers else x
        return {"representations": representations}


def rotate(x, cos, sin):
    """Rotary positions on [B, H, L, d], the halves of each head rotated (not interleaved)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin
