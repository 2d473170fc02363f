"""One decoding step of a GPT in few operations: one new token per row, after a KV cache.

GPT.forward serves every case (training, a prompt of many tokens, dropout), through some 30
tensor operations and 10 module calls a layer. When a step decodes one token per row, its
products read every weight once and, on a small model, cost about as much as that fixed
overhead. DecodeStep computes the same step with the parameters read out of the model once:
(B, C) tensors instead of (B, 1, C), no module call inside a layer, a plain linear layer's
product as one torch.addmm, and the split into heads as one view. Its logits equal
GPT.forward's on the same cache up to float rounding (tests/test_decode_step.py).

It reads the model as it is when made: make one per generation, after any change to the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.models.blocks import activate, apply_rotary, normalize_heads
from gptlab.models.fused_loss import cap_logits
from gptlab.models.gpt import GPT
from gptlab.models.kv_cache import KVCache
from gptlab.models.matvec import MatVecLinear

Fn = Callable[[torch.Tensor], torch.Tensor]


def product(linear: nn.Module) -> Fn:
    """x (B, in) -> (B, out) as `linear` computes it: one addmm for a plain layer (nn.Linear, or
    a MatVecLinear in an unsplit layout), the layer's own forward otherwise (int8, LoRA, split)."""
    if type(linear) is nn.Linear or (type(linear) is MatVecLinear and linear.splits == 1):
        weight_t, bias = linear.weight.t(), linear.bias  # (in, out): a view, in either memory order
        if bias is None:
            return lambda x: torch.mm(x, weight_t)
        return lambda x: torch.addmm(bias, x, weight_t)
    return linear.forward


def normalize(norm: nn.Module) -> Fn:
    """x (B, C) -> (B, C) as the norm module computes it, without the module call."""
    if type(norm) is nn.LayerNorm:
        return partial(
            F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight, bias=norm.bias, eps=norm.eps
        )
    if type(norm) is nn.RMSNorm:
        return partial(F.rms_norm, normalized_shape=norm.normalized_shape, weight=norm.weight, eps=norm.eps)
    return norm.forward


@dataclass(frozen=True)
class _Layer:
    """One Block's computations on (B, ·) rows."""

    norm_1: Fn
    qkv: Fn
    proj: Fn
    norm_2: Fn
    fc: Fn
    activate: Fn
    mlp_proj: Fn


class DecodeStep:
    """GPT.forward(ids[:, None], kv_cache=cache, last_only=True) for a model in eval mode,
    computed with fewer operations (module docstring)."""

    def __init__(self, model: GPT):
        if model.training:
            raise ValueError("DecodeStep leaves out dropout: put the model in eval mode first")
        self.model = model
        self.layers = [
            _Layer(
                normalize(block.norm_1),
                product(block.attn.qkv),
                product(block.attn.proj),
                normalize(block.norm_2),
                product(block.mlp.fc),
                partial(activate, activation=block.mlp.activation),
                product(block.mlp.proj),
            )
            for block in model.blocks
        ]
        self.norm_f, self.head = normalize(model.norm_f), product(model.lm_head)
        self.qk_norm_eps = model.config.norm_eps if model.config.qk_norm else None  # None: no QK-norm
        self.unet_skips = model.skip_weights is not None  # without skips, no method calls a layer
        self.smear = model.smear_gate is not None

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) of the token ids (B,) that follow each row's cached slots; they take
        the next slot of every layer (cache.length grows by one)."""
        model, start, B = self.model, cache.length, ids.size(0)
        nh, hs = model.config.n_heads, model.config.head_dim
        model.check_positions(start, 1)
        positions = cache.start(1)  # (B, 1) for left-padded rows, else None
        x = model.wte(ids)  # (B, C)
        if self.smear:
            x = model.smear(x[:, None], cache, positions)[:, 0]
        if model.wpe is not None:
            x = x + model.wpe(1, start, positions).flatten(0, -2)  # (1, C) or (B, C)
        rope = model.rotary(1, start, positions) if model.rotary is not None else None
        if rope is not None and positions is not None:
            rope = tuple(table[:, None] for table in rope)  # (B, 1, 1, 1, hs/2): over q|k and the heads
        values = model.layer_values(ids)  # (B, C) or None a layer
        outputs: list[torch.Tensor] = []  # the first half's, for the U-net skips
        for i, layer in enumerate(self.layers):
            if self.unet_skips:
                x = model.add_skip(x, i, outputs)
            # Each row holds q, k and v side by side, each the heads of one position: (B, 3, nh, 1, hs).
            qkv = layer.qkv(layer.norm_1(x)).view(B, 3, nh, 1, hs)
            if rope is None:
                q, k, v = qkv.unbind(1)  # (B, nh, 1, hs) each
                if self.qk_norm_eps is not None:
                    q, k = normalize_heads(q, self.qk_norm_eps), normalize_heads(k, self.qk_norm_eps)
            else:  # q and k normalised and rotated in one go
                qk, v = qkv[:, :2], qkv[:, 2]
                if self.qk_norm_eps is not None:
                    qk = normalize_heads(qk, self.qk_norm_eps)
                q, k = apply_rotary(qk, rope).unbind(1)
            if values[i] is not None:
                v = v + values[i].view(B, nh, 1, hs)
            k, v = cache.store(i, k, v)  # (B, nh, S, hs): every slot so far
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)  # (B, nh, 1, hs)
            x = x + layer.proj(y.reshape(B, nh * hs))
            x = x + layer.mlp_proj(layer.activate(layer.fc(layer.norm_2(x))))
            if self.unet_skips:
                model.keep_for_skip(x, i, outputs)
        cache.advance(1)
        return cap_logits(self.head(self.norm_f(x)), model.config.logit_softcap)  # (B, V)
