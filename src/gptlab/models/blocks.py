"""The parts a Transformer is built from: norms, positional encodings, attention, MLP, block.

Every tensor inside attention is kept in the (B, n_heads, T, head_dim) layout, the layout of
the KV cache (models/kv_cache.py). Positional encodings take a `start_pos` (every row at the
same offset) or a (B, T) tensor of `positions` (left-padded rows, each starting at 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import ModelConfig
from gptlab.models.attention_choice import causal_attention
from gptlab.models.dropout import Dropout
from gptlab.models.kv_cache import KVCache

try:  # optional, `pip install gptlab[flash]`; PyTorch's SDPA is used otherwise
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, hs/2) or (B, 1, T, hs/2)


def make_norm(config: ModelConfig) -> nn.Module:
    """The normalisation layer the config names, over the last dimension (embed_dim)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.embed_dim, eps=config.norm_eps)
    return nn.LayerNorm(config.embed_dim, eps=config.norm_eps, bias=config.bias)


# ---- positional encodings ------------------------------------------------------------------


class LearnedPositions(nn.Module):
    """A trained vector per position (GPT-2's wpe), added to the token embeddings."""

    def __init__(self, seq_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(seq_len, dim))
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, T: int, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of positions start_pos .. start_pos+T-1: (T, dim); or of `positions` (B, T): (B, T, dim)."""
        if positions is not None:
            return self.weight[positions]
        return self.weight[start_pos : start_pos + T]


class SinusoidalPositions(nn.Module):
    """The fixed sin/cos table of "Attention Is All You Need", added to the token embeddings."""

    def __init__(self, seq_len: int, dim: int, base: float = 10000.0):
        super().__init__()
        position = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)  # (seq_len, 1)
        inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (ceil(dim/2),)
        angles = position * inv_freq  # (seq_len, ceil(dim/2))
        table = torch.zeros(seq_len, dim)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : dim // 2])  # an odd dim has one sine more
        # Not persistent: it is a function of the config, so checkpoints need not carry it.
        self.register_buffer("table", table, persistent=False)

    def forward(self, T: int, start_pos: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of positions start_pos .. start_pos+T-1: (T, dim); or of `positions` (B, T): (B, T, dim)."""
        if positions is not None:
            return self.table[positions]
        return self.table[start_pos : start_pos + T]


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotates query/key pairs by position-dependent angles, so that
    attention scores depend only on relative positions. Pairs are (i, i + head_dim/2), the
    "rotate half" convention of GPT-NeoX and Llama in Hugging Face."""

    def __init__(self, head_dim: int, seq_len: int, theta: float):
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (seq_len, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, T: int, start_pos: int = 0, positions: torch.Tensor | None = None) -> RopeTables:
        """cos and sin of positions start_pos .. start_pos+T-1, each (T, hs/2); or of
        `positions` (B, T), each (B, 1, T, hs/2) to broadcast over the heads."""
        if positions is not None:
            return self.cos[positions][:, None], self.sin[positions][:, None]
        return self.cos[start_pos : start_pos + T], self.sin[start_pos : start_pos + T]


def normalize_heads(x: torch.Tensor, eps: float) -> torch.Tensor:
    """QK-norm: each head's vector (the last dimension) scaled to unit RMS, without a gain, so
    that attention logits stay bounded however large the query and key weights grow."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by the angles in rope; same shape and dtype out."""
    cos, sin = (table.to(x.dtype) for table in rope)  # (T, hs/2) or (B, 1, T, hs/2), broadcast
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# ---- the Transformer block -----------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and earlier ones."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qk_norm_eps = config.norm_eps if config.qk_norm else None  # None: no QK-norm
        self.dropout = config.attention_dropout_p
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.bias)  # q, k, v at once
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeTables | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a cache, x holds only the new tokens; their keys and
        values are stored in slot `layer` of the cache and they attend to every slot before them.
        value_embed (B, T, C), when given, is added to the values (GPT's value embeddings)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        if value_embed is not None:
            v = v + value_embed
        hs = C // self.n_heads
        q, k, v = (t.view(B, T, self.n_heads, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm_eps is not None:
            q, k = normalize_heads(q, self.qk_norm_eps), normalize_heads(k, self.qk_norm_eps)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.store(layer, k, v)  # (B, nh, S, hs), S = slots so far
            mask = kv_cache.mask
        y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.proj(y))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(hs) + mask) v: q (B, nh, T, hs), k and v (B, nh, S, hs).

        Without a mask, T > 1 queries are causal from slot 0 (S == T) and one query sees all S
        keys; a KVCache supplies the mask in every other case (padding, a chunk after a past).
        """
        dropout_p = self.dropout if self.training else 0.0
        is_causal = mask is None and q.size(2) > 1
        if mask is None and use_flash_attn(q):
            out = flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, causal=is_causal
            )
            return out.transpose(1, 2)  # flash_attn works in (B, T, nh, hs)
        if is_causal and dropout_p == 0 and q.device.type == "cpu":
            return causal_attention(q, k, v)  # the fused kernel or, when faster here, the explicit form
        # On CUDA, PyTorch picks its own flash / memory-efficient kernel here.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def use_flash_attn(q: torch.Tensor) -> bool:
    """Whether the flash_attn package is installed and supports this tensor (CUDA, 16-bit)."""
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def swiglu_hidden_dim(config: ModelConfig) -> int:
    """SwiGLU's hidden width: 2/3 of expansion_factor * embed_dim, so that its three matrices
    hold about as many weights as the two of a plain MLP (Shazeer 2020), rounded up to a
    multiple of 8 so that matrix shapes suit GPU kernels."""
    hidden = 2 * config.expansion_factor * config.embed_dim / 3
    return 8 * math.ceil(hidden / 8)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, nonlinearity, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        if config.activation == "swiglu":
            hidden = swiglu_hidden_dim(config)
            self.fc = nn.Linear(config.embed_dim, 2 * hidden, bias=config.bias)  # gate and value at once
        else:
            hidden = config.expansion_factor * config.embed_dim
            self.fc = nn.Linear(config.embed_dim, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.embed_dim, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = activate(self.fc(x), self.activation)  # (B, T, hidden)
        return self.dropout(self.proj(h))


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's nonlinearity on its widened h (..., hidden), or (..., 2 * hidden) for swiglu."""
    if activation == "gelu":
        return F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
    if activation == "relu2":
        return F.relu(h).square()  # Primer (So et al. 2021)
    gate, value = h.chunk(2, dim=-1)  # (..., hidden) each
    return F.silu(gate) * value


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeTables | None = None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, kv_cache, layer, value_embed)  # (B, T, C)
        return x + self.mlp(self.norm_2(x))
