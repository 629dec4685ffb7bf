"""ESM-2 and ESM-1b over packed token streams: fair-esm's ESM2.forward and
ProteinBertModel.forward without padding.

A batch is one stream of T tokens, every sequence as <cls> residues <eos>, back to back;
``cu_seqlens`` [B+1] marks where each sequence starts. Shapes: D = embed_dim, H = heads,
d = D / H. The function is fair-esm's (token-dropout rescale, positions restarting at every
sequence: rotary for ESM-2, learned and added to the embeddings, then maybe a LayerNorm, for
ESM-1b; pre-LayerNorm layers, exact erf GELU, final LayerNorm after the last layer); the residual
stream, LayerNorms and rotary angles are float32, the matrix products run in the compute dtype
(float16 on GPU by default) with float32 accumulation.

A layer hands the next its stream and its feed-forward's output apart, (x, branch): the next
layer's first LayerNorm adds them in the pass that normalises (on CUDA, norm_kernel.py), where a
separate add would move the float32 stream once more (5% of ESM-2 650M's forward on an H100).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Token dropout in training masked 15% x 80% of tokens; at inference fair-esm rescales the
# embeddings by (1 - 0.12) / (1 - observed mask ratio), and embeddings here contain no masks.
TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8


class PackedLayer(nn.Module):
    """One pre-LayerNorm transformer layer of ESM-2, with q, k and v in one projection."""

    def __init__(self, layer, dtype: torch.dtype, device):
        super().__init__()
        attn = layer.self_attn
        self.heads = attn.num_heads
        self.eps = layer.self_attn_layer_norm.eps  # the model's config's (fair-esm's is 1e-5)
        self.attn_norm = _copy(layer.self_attn_layer_norm, torch.float32, device)
        self.qkv = _linear(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
            [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias],
            dtype,
            device,
        )
        self.out_proj = _copy(attn.out_proj, dtype, device)
        self.ffn_norm = _copy(layer.final_layer_norm, torch.float32, device)
        self.fc1 = _copy(layer.fc1, dtype, device)
        self.fc2 = _copy(layer.fc2, dtype, device)

    def forward(self, x, branch, cos, sin, cu_seqlens, max_len: int, steps):
        # x: [T, D] float32, branch: [T, D] in the compute dtype or None (the stream is x + branch);
        # cos, sin: [T, d] float32. steps: the two halves around attention (on CUDA the first
        # rotates q and k with the Triton kernel). Returns the next (x, branch).
        attention_inputs, attention_output_and_ffn = steps
        norm1, norm2 = self.attn_norm, self.ffn_norm
        x, q, k, v = attention_inputs(
            x, branch, cos, sin, norm1.weight, norm1.bias, self.qkv.weight, self.qkv.bias, self.heads, self.eps
        )
        attended = attention(q, k, v, cu_seqlens, max_len)  # [T, H, d]: softmax(q k^T / sqrt(d)) v
        return attention_output_and_ffn(
            x,
            attended,
            self.out_proj.weight,
            self.out_proj.bias,
            norm2.weight,
            norm2.bias,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.eps,
        )


def attention_inputs(x, branch, cos, sin, norm_weight, norm_bias, qkv_weight, qkv_bias, heads: int, eps: float):
    """The stream x + branch, then LayerNorm, fused q/k/v projection, rotary on q and k (none where
    cos is None, ESM-1b): [T, D] -> the stream [T, D] and 3 x [T, H, d]."""
    T, D = x.shape
    x, qkv = qkv_projection(x, branch, norm_weight, norm_bias, qkv_weight, qkv_bias, eps)
    q, k, v = qkv.view(T, 3, heads, D // heads).unbind(1)
    if cos is None:
        return x, q, k, v
    return x, _rotate(q, cos, sin), _rotate(k, cos, sin), v


def qkv_projection(x, branch, norm_weight, norm_bias, qkv_weight, qkv_bias, eps: float):
    """The stream x + branch (branch None: x), and its LayerNorm through the fused q/k/v
    projection: [T, D] -> [T, D] float32, [T, 3D] in the compute dtype."""
    x, normed = added_and_normed(x, branch, norm_weight, norm_bias, eps, qkv_weight.dtype)
    return x, F.linear(normed, qkv_weight, qkv_bias)


def attention_output_and_ffn(
    x, attended, out_weight, out_bias, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps: float
):
    """Output projection and residual, then LayerNorm, fc1, exact GELU and fc2: the stream [T, D]
    float32 and fc2's output [T, D] in the compute dtype, its residual (the next layer adds it)."""
    T, D = x.shape
    attention_output = F.linear(attended.reshape(T, D), out_weight, out_bias)
    x, normed = added_and_normed(x, attention_output, norm_weight, norm_bias, eps, fc1_weight.dtype)
    return x, F.linear(F.gelu(F.linear(normed, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def added_and_normed(x, residual, norm_weight, norm_bias, eps: float, dtype: torch.dtype):
    """(x + residual (None: nothing) in float32, its LayerNorm in ``dtype``); x: [T, D] float32.
    On CUDA through norm_kernel.py's Triton kernel (one pass instead of three kernels)."""
    if x.is_cuda and NORM_KERNEL:
        from esmshard.norm_kernel import layer_norm

        return layer_norm(x, norm_weight, norm_bias, eps, dtype, residual)
    if residual is not None:
        x = x + residual
    return x, F.layer_norm(x, (x.shape[1],), norm_weight, norm_bias, eps).to(dtype)


class PackedESM(nn.Module):
    padded = False  # batches are budgeted in tokens, not in padded tokens

    def __init__(self, network, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """Built on ``device`` from a loaded fair-esm ESM2 or ProteinBertModel (float32 weights),
        sharing nothing with it."""
        super().__init__()
        self.num_layers = network.num_layers
        self.embed_dim = network.embed_tokens.embedding_dim
        self.dtype = dtype
        self.token_dropout = token_dropout(network)
        self.mask_idx = network.mask_idx
        self.embed_tokens = _embedding(network.embed_tokens, device)
        self.layers = nn.ModuleList(PackedLayer(layer, dtype, device) for layer in network.layers)
        self.final_norm = _copy(network.emb_layer_norm_after, torch.float32, device)
        self.rotary = not hasattr(network, "embed_positions")
        if self.rotary:
            inv_freq = network.layers[0].self_attn.rot_emb.inv_freq.to(device, torch.float32, copy=True)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d / 2]
        else:
            self.embed_positions = _embedding(network.embed_positions, device)  # [max positions + 2, D]
            self.position_offset = network.padding_idx + 1  # position 0 (<cls>) is row padding_idx + 1
            before = network.emb_layer_norm_before
            self.embed_norm = _copy(before, torch.float32, device) if before else None
        rotary_kernel = self.rotary and torch.device(device).type == "cuda" and ROTARY_KERNEL
        self.steps = (
            with_rotary_kernel(qkv_projection) if rotary_kernel else attention_inputs,
            attention_output_and_ffn,
        )

    def hidden_states(self, tokens, positions, cu_seqlens, max_len: int, layers):
        """Yields (layer, hidden states [T, D] float32) for each of ``layers`` (increasing;
        0: embeddings; num_layers: the final, normed output), as the forward reaches it.

        tokens, positions: [T] int64 (positions restart at 0 on every <cls>); cu_seqlens: [B+1] int32.
        """
        x = self.embed_tokens(tokens)  # [T, D]
        if self.token_dropout:
            x = x.masked_fill((tokens == self.mask_idx)[:, None], 0.0) * TOKEN_DROPOUT_SCALE
        if self.rotary:
            angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d / 2]
            angles = torch.cat([angles, angles], dim=-1)  # [T, d]
            cos, sin = angles.cos(), angles.sin()
        else:
            cos = sin = None
            x = x + self.embed_positions(positions + self.position_offset)
            if self.embed_norm is not None:
                x = self.embed_norm(x)
        branch = None
        for layer in range(max(layers) + 1):
            if layer > 0:
                x, branch = self.layers[layer - 1](x, branch, cos, sin, cu_seqlens, max_len, self.steps)
            if layer in layers:
                yield layer, layer_output(x, branch, layer, self)


def layer_output(x, branch, layer: int, model) -> torch.Tensor:
    """The stream x + branch after ``layer`` of ``model``, the last layer's through its final
    LayerNorm: [T, D] float32."""
    x = x if branch is None else x + branch
    return model.final_norm(x) if layer == model.num_layers else x


def token_dropout(network) -> bool:
    """Whether fair-esm's module rescales its embeddings for token dropout (ESM2 says so itself,
    ProteinBertModel's config does)."""
    return bool(getattr(network, "token_dropout", getattr(getattr(network, "args", None), "token_dropout", False)))


class PackedESMCLayer(nn.Module):
    """One block of ESM C (esmc.py): its residual scale folded into the two output projections."""

    def __init__(self, block, dtype: torch.dtype, device):
        super().__init__()
        attn, (ffn_norm, fc1, _, fc2) = block.attn, block.ffn
        self.heads = attn.heads
        self.attn_norm = _copy(attn.layernorm_qkv[0], torch.float32, device)
        self.qkv = _copy(attn.layernorm_qkv[1], dtype, device)
        self.q_norm = _copy(attn.q_ln, torch.float32, device)
        self.k_norm = _copy(attn.k_ln, torch.float32, device)
        # both, for the fused kernel (one eps: EvolutionaryScale's LayerNorms all have torch's default)
        qk_weights = torch.stack([self.q_norm.weight.detach(), self.k_norm.weight.detach()])  # [2, D]
        self.register_buffer("qk_norm_weights", qk_weights, persistent=False)
        self.qk_kernel = torch.device(device).type == "cuda" and ROTARY_KERNEL and attn.q_ln.eps == attn.k_ln.eps
        self.out_proj = _copy(attn.out_proj, dtype, device, scale=1 / block.scale)
        self.ffn_norm = _copy(ffn_norm, torch.float32, device)
        self.fc1 = _copy(fc1, dtype, device)
        self.fc2 = _copy(fc2, dtype, device, scale=1 / block.scale)
        self.swiglu_kernel = torch.device(device).type == "cuda" and SWIGLU_KERNEL

    def forward(self, x, branch, cos, sin, cu_seqlens, max_len: int):
        # as PackedLayer.forward: x [T, D] float32, the stream x + branch; cos, sin: [T, d] float32
        T, D = x.shape
        dtype = self.qkv.weight.dtype
        norm1 = self.attn_norm
        x, normed = added_and_normed(x, branch, norm1.weight, norm1.bias, norm1.eps, dtype)
        qkv = F.linear(normed, self.qkv.weight)  # [T, 3D]
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x [T, D]
        if self.qk_kernel:
            from esmshard.rotary_kernel import norm_rotate_qk

            q, k = norm_rotate_qk(qkv, self.qk_norm_weights, self.q_norm.eps, cos, sin, self.heads)  # [T, H, d]
        else:
            q = F.layer_norm(q.float(), (D,), self.q_norm.weight, None, self.q_norm.eps).view(T, self.heads, -1)
            k = F.layer_norm(k.float(), (D,), self.k_norm.weight, None, self.k_norm.eps).view(T, self.heads, -1)
            q, k = _rotate(q, cos, sin).to(dtype), _rotate(k, cos, sin).to(dtype)  # [T, H, d]
        attended = attention(q, k, v.reshape(T, self.heads, -1), cu_seqlens, max_len)  # [T, H, d]
        attention_output = F.linear(attended.reshape(T, D), self.out_proj.weight)
        norm2 = self.ffn_norm
        x, normed = added_and_normed(x, attention_output, norm2.weight, norm2.bias, norm2.eps, dtype)
        projected = F.linear(normed, self.fc1.weight)  # [T, 2F]: gate, value
        if self.swiglu_kernel:
            from esmshard.swiglu_kernel import swiglu

            hidden = swiglu(projected)  # [T, F]
        else:
            gate, value = projected.chunk(2, dim=-1)
            hidden = F.silu(gate) * value
        return x, F.linear(hidden, self.fc2.weight)


class PackedESMC(nn.Module):
    padded = False

    def __init__(self, network, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """Built on ``device`` from a loaded esmc.ESMC (float32 weights), sharing nothing with it."""
        super().__init__()
        self.num_layers = network.num_layers
        self.embed_dim = network.embed.embedding_dim
        self.dtype = dtype
        self.embed_tokens = _embedding(network.embed, device)
        self.layers = nn.ModuleList(PackedESMCLayer(block, dtype, device) for block in network.transformer.blocks)
        self.final_norm = _copy(network.transformer.norm, torch.float32, device)
        self.register_buffer("inv_freq", network.inv_freq.to(device, torch.float32, copy=True), persistent=False)

    def hidden_states(self, tokens, positions, cu_seqlens, max_len: int, layers):
        """As PackedESM.hidden_states."""
        x = self.embed_tokens(tokens)  # [T, D]
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, d / 2]
        angles = torch.cat([angles, angles], dim=-1)  # [T, d]
        cos, sin = angles.cos(), angles.sin()
        branch = None
        for layer in range(max(layers) + 1):
            if layer > 0:
                x, branch = self.layers[layer - 1](x, branch, cos, sin, cu_seqlens, max_len)
            if layer in layers:
                yield layer, layer_output(x, branch, layer, self)


class PaddedProtT5(nn.Module):
    """ProtT5 behind the packed modules' interface: its relative position bias needs the [L, L]
    attention of each piece, so the stream is padded to [pieces, longest] for the forward and
    unpadded after (batches are budgeted in padded tokens, of length-sorted pieces)."""

    padded = True

    def __init__(self, network, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        super().__init__()
        from esmshard.prott5 import PAD, ProtT5

        with torch.device(device), without_initialisation():
            self.network = ProtT5(network.config).to(dtype).eval()
        # float32 where it costs little: the embeddings (so the residual stream is float32, as the
        # packed modules'), the final LayerNorm, and (on the CPU) the feed-forward's output
        # projection, whose output T5 overflows in float16 (on CUDA prott5.DenseReluDense returns
        # that product in float32 from half-precision weights)
        self.network.shared.float()
        self.network.encoder.final_layer_norm.float()
        if torch.device(device).type != "cuda":
            for block in self.network.encoder.block:
                block.layer[1].DenseReluDense.wo.float()
        with torch.no_grad():
            for name, tensor in network.state_dict().items():
                self.network.get_parameter(name).copy_(tensor)
        self.pad = PAD

    def hidden_states(self, tokens, positions, cu_seqlens, max_len: int, layers):
        """As PackedESM.hidden_states."""
        pieces = len(cu_seqlens) - 1
        token_piece = torch.repeat_interleave(torch.arange(pieces, device=tokens.device), cu_seqlens.diff())  # [T]
        # L a multiple of 8: SDPA pads an [P, H, L, L] mask of another width to one, in every
        # layer (4% of ProtT5-XL's time on an H100)
        length = -(-max_len // ATTENTION_MASK_ALIGNMENT) * ATTENTION_MASK_ALIGNMENT
        padded = torch.full((pieces, length), self.pad, dtype=tokens.dtype, device=tokens.device)  # [P, L]
        padded[token_piece, positions] = tokens
        for layer, hidden in self.network.hidden_states(padded, layers):  # [P, L, D]
            yield layer, hidden[token_piece, positions].float()  # [T, D]


ATTENTION_MASK_ALIGNMENT = 8


def packed_model(network, dtype: torch.dtype, device):
    """The packed module of a loaded model of any family."""
    from esmshard.esmc import ESMC
    from esmshard.prott5 import ProtT5

    if isinstance(network, ProtT5):
        return PaddedProtT5(network, dtype, device)
    return (PackedESMC if isinstance(network, ESMC) else PackedESM)(network, dtype, device)


def heads_of(network) -> int:
    return network.heads if hasattr(network, "heads") else network.layers[0].self_attn.num_heads


def rotary_kernel_of(network) -> str | None:
    """Which kernel of rotary_kernel.py the packed module runs on CUDA (see kernel_warmups)."""
    from esmshard.esmc import ESMC

    if isinstance(network, ESMC):
        return "normed"
    return "plain" if hasattr(network, "layers") and not hasattr(network, "embed_positions") else None


# On CUDA: rotary through rotary_kernel.py (Triton), one pass instead of eager torch's eight.
ROTARY_KERNEL = True
# On CUDA: the residual adds and LayerNorms through norm_kernel.py (Triton). Eager with these two
# kernels runs as fast as torch.compile's autotuned code (docs/benchmarks.md), with no compiling.
NORM_KERNEL = True
# On CUDA: ESM C's SwiGLU through swiglu_kernel.py (Triton), one pass instead of eager torch's two.
SWIGLU_KERNEL = True


def with_rotary_kernel(projection):
    """attention_inputs with ``projection`` (qkv_projection) and q and k rotated
    by rotary_kernel.py's Triton kernel (CUDA only; the same float32 arithmetic as _rotate)."""
    from esmshard.rotary_kernel import rotate_qk

    def inputs(x, branch, cos, sin, norm_weight, norm_bias, qkv_weight, qkv_bias, heads: int, eps: float):
        x, qkv = projection(x, branch, norm_weight, norm_bias, qkv_weight, qkv_bias, eps)  # [T, D], [T, 3D]
        q, k = rotate_qk(qkv, cos, sin, heads)
        return x, q, k, qkv.view(len(x), 3, heads, -1)[:, 2]

    return inputs


def kernel_warmups(network, dtype: torch.dtype, device) -> list:
    """Functions that run the kernels the packed module of ``network`` runs on CUDA, on 8 tokens,
    so that they are ready: attention (with its rotary kernel, rotary_kernel_of), LayerNorm and
    ESM C's SwiGLU; none for ProtT5, whose padded path runs none of them. Triton compiles each
    kernel on its first launch (~1-2 s on a fresh machine, ~0.5 s from its cache). PackedEngine
    runs them on threads of their own while the weights go to the GPU; Triton compiles mostly
    without the GIL, so compiles on several threads overlap."""
    from esmshard.prott5 import ProtT5

    if isinstance(network, ProtT5):
        return []
    heads = heads_of(network)
    head_dim = network.embed_tokens.embedding_dim // heads
    rotary = rotary_kernel_of(network)

    @torch.inference_mode()
    def attention_and_rotary():
        qkv = torch.zeros(8, 3, heads, head_dim, dtype=dtype, device=device)  # [T, 3, H, d]
        q, k, v = qkv.unbind(1)
        if rotary and ROTARY_KERNEL:
            from esmshard.rotary_kernel import norm_rotate_qk, rotate_qk

            cos = torch.ones(8, head_dim, device=device)  # [T, d]
            if rotary == "plain":
                q, k = rotate_qk(qkv.view(8, -1), cos, torch.zeros_like(cos), heads)
            else:
                weights = torch.ones(2, heads * head_dim, device=device)
                q, k = norm_rotate_qk(qkv.view(8, -1), weights, 1e-5, cos, torch.zeros_like(cos), heads)
        attention(q, k, v, torch.tensor([0, 8], dtype=torch.int32, device=device), 8)
        torch.cuda.synchronize(device)

    @torch.inference_mode()
    def layer_norm():
        # one call readies both uses: with and without the residual add are one compiled kernel
        stream = torch.zeros(8, heads * head_dim, device=device)  # [T, D] float32
        norm = torch.ones(heads * head_dim, device=device)
        added_and_normed(stream, stream.to(dtype), norm, norm, 1e-5, dtype)
        torch.cuda.synchronize(device)

    @torch.inference_mode()
    def swiglu():
        from esmshard.swiglu_kernel import swiglu as kernel

        kernel(torch.zeros(8, network.transformer.blocks[0].ffn[1].out_features, dtype=dtype, device=device))
        torch.cuda.synchronize(device)

    warmups = [attention_and_rotary]
    warmups += [layer_norm] if NORM_KERNEL else []
    warmups += [swiglu] if SWIGLU_KERNEL and rotary == "normed" else []
    return warmups


def _rotate(x, cos, sin):
    """Rotary embedding of [T, H, d] in float32, as fair-esm's apply_rotary_pos_emb."""
    x32 = x.float()
    half1, half2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-half2, half1], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def attention(q, k, v, cu_seqlens, max_len: int):
    """Attention within each sequence of a packed stream; q, k, v: [T, H, d] -> [T, H, d]."""
    if q.is_cuda and q.dtype != torch.float32:
        # FlashAttention's variable-length kernel, as torch.nn.attention.varlen.varlen_attn calls
        # it (no dropout, not causal), without that wrapper: its custom-op machinery takes 3.5-4.5 s
        # on its first call in a process (torch 2.11, H200); the op itself starts at once.
        return torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False
        )[0]
    # The CPU, and float32 on a GPU (FlashAttention takes fp16/bf16 only): the same math, one
    # sequence at a time.
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q_, k_, v_ = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, d]
        out[start:end] = F.scaled_dot_product_attention(q_, k_, v_).transpose(0, 1)
    return out


def _linear(weights: list, biases: list, dtype, device, scale: float = 1.0) -> nn.Linear:
    """An nn.Linear holding copies of these tensors (biases None: none), one under the other (q, k
    and v in one), multiplied by ``scale`` before the cast to ``dtype``."""
    with without_initialisation():
        linear = nn.Linear(
            weights[0].shape[1], sum(len(w) for w in weights), bias=biases[0] is not None, device=device, dtype=dtype
        )
    with torch.no_grad():
        at = 0
        for weight, bias in zip(weights, biases):  # each straight to its rows: no concatenated copy first
            linear.weight[at : at + len(weight)].copy_(weight if scale == 1 else weight.float() * scale)
            if bias is not None:
                linear.bias[at : at + len(weight)].copy_(bias if scale == 1 else bias.float() * scale)
            at += len(weight)
    return linear


def _embedding(embedding: nn.Embedding, device) -> nn.Embedding:
    """A float32 copy of ``embedding``'s table on ``device``."""
    return nn.Embedding.from_pretrained(embedding.weight.to(device, torch.float32, copy=True))


def _copy(module, dtype, device, scale: float = 1.0):
    """A copy of an nn.Linear (times ``scale``), or of an nn.LayerNorm (its eps too, its bias if
    it has one), in dtype on device."""
    if isinstance(module, nn.LayerNorm):
        with without_initialisation():
            copy = nn.LayerNorm(
                module.normalized_shape, eps=module.eps, bias=module.bias is not None, device=device, dtype=dtype
            )
        with torch.no_grad():
            copy.weight.copy_(module.weight)
            if module.bias is not None:
                copy.bias.copy_(module.bias)
        return copy
    return _linear([module.weight], [module.bias], dtype, device, scale)


@contextlib.contextmanager
def without_initialisation():
    """torch.nn.init's functions do nothing meanwhile (as transformers' no_init_weights), so modules
    built now hold uninitialised memory, to be overwritten. Not the meta device (or
    nn.utils.skip_init, which uses it): its arithmetic goes through torch._refs and imports sympy,
    seconds of a rank's start-up."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "ones_", "zeros_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)
