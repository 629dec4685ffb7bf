"""ESM-2 over packed token streams: fair-esm's ESM2.forward without padding.

A batch is one stream of T tokens, every sequence as <cls> residues <eos>, back to back;
``cu_seqlens`` [B+1] marks where each sequence starts. Shapes: D = embed_dim, H = heads,
d = D / H. The function is fair-esm's (token-dropout rescale, rotary positions restarting at
every sequence, pre-LayerNorm layers, exact erf GELU, final LayerNorm after the last layer);
the residual stream, LayerNorms and rotary angles are float32, the matrix products run in the
compute dtype (bfloat16 on GPU) with float32 accumulation.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Token dropout in training masked 15% x 80% of tokens; at inference fair-esm rescales the
# embeddings by (1 - 0.12) / (1 - observed mask ratio), and embeddings here contain no masks.
TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8


class PackedLayer(nn.Module):
    """One pre-LayerNorm transformer layer of ESM-2, with q, k and v in one projection."""

    def __init__(self, layer, dtype: torch.dtype):
        super().__init__()
        attn = layer.self_attn
        self.heads = attn.num_heads
        self.attn_norm = _float32_copy(layer.self_attn_layer_norm)
        self.qkv = nn.Linear(attn.embed_dim, 3 * attn.embed_dim)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
            self.qkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        self.qkv.to(dtype)
        self.out_proj = _copy(attn.out_proj, dtype)
        self.ffn_norm = _float32_copy(layer.final_layer_norm)
        self.fc1 = _copy(layer.fc1, dtype)
        self.fc2 = _copy(layer.fc2, dtype)

    def forward(self, x, cos, sin, cu_seqlens, max_len: int):
        # x: [T, D] float32; cos, sin: [T, d] float32
        T, D = x.shape
        dtype = self.qkv.weight.dtype
        qkv = self.qkv(self.attn_norm(x).to(dtype)).view(T, 3, self.heads, D // self.heads)
        q, k, v = qkv.unbind(dim=1)  # [T, H, d] each
        q = _rotate(q, cos, sin)
        k = _rotate(k, cos, sin)
        attended = attention(q, k, v, cu_seqlens, max_len).reshape(T, D)  # softmax(q k^T / sqrt(d)) v
        x = x + self.out_proj(attended).float()
        x = x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x).to(dtype)))).float()
        return x


class PackedESM2(nn.Module):
    def __init__(self, network, dtype: torch.dtype = torch.bfloat16):
        """Built from a loaded fair-esm ESM2 (float32 weights), sharing nothing with it."""
        super().__init__()
        self.num_layers = network.num_layers
        self.embed_dim = network.embed_dim
        self.dtype = dtype
        self.token_dropout = network.token_dropout
        self.mask_idx = network.mask_idx
        self.embed_tokens = nn.Embedding.from_pretrained(network.embed_tokens.weight.detach().float().clone())
        self.layers = nn.ModuleList(PackedLayer(layer, dtype) for layer in network.layers)
        self.final_norm = _float32_copy(network.emb_layer_norm_after)
        inv_freq = network.layers[0].self_attn.rot_emb.inv_freq.detach().float().clone()
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d / 2]

    def forward(self, tokens, positions, cu_seqlens, max_len: int, layer: int):
        """Hidden states [T, D] (float32) after ``layer`` (0: embeddings; num_layers: final, normed).

        tokens, positions: [T] int64 (positions restart at 0 on every <cls>); cu_seqlens: [B+1] int32.
        """
        x = self.embed_tokens(tokens)  # [T, D]
        if self.token_dropout:
            x = x.masked_fill((tokens == self.mask_idx)[:, None], 0.0) * TOKEN_DROPOUT_SCALE
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d / 2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, d]
        cos, sin = angles.cos(), angles.sin()
        for block in self.layers[:layer]:
            x = block(x, cos, sin, cu_seqlens, max_len)
        if layer == self.num_layers:
            x = self.final_norm(x)
        return x


def _rotate(x, cos, sin):
    """Rotary embedding of [T, H, d] in float32, as fair-esm's apply_rotary_pos_emb."""
    x32 = x.float()
    half1, half2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-half2, half1], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def attention(q, k, v, cu_seqlens, max_len: int):
    """Attention within each sequence of a packed stream; q, k, v: [T, H, d] -> [T, H, d]."""
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    # The CPU path (tests): the same math, one sequence at a time.
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_, k_, v_ = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, d]
        out[start:end] = F.scaled_dot_product_attention(q_, k_, v_).transpose(0, 1)
    return out


def _copy(linear: nn.Linear, dtype) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features)
    copy.load_state_dict(linear.state_dict())
    return copy.to(dtype)


def _float32_copy(norm: nn.LayerNorm) -> nn.LayerNorm:
    copy = nn.LayerNorm(norm.normalized_shape, eps=norm.eps)
    copy.load_state_dict(norm.state_dict())
    return copy.float()
