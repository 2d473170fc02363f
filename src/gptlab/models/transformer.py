"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), pre-norm.

The encoder reads the whole source at once (self-attention that ignores <PAD> keys); the
decoder writes the target left to right (causal self-attention) while reading the encoder's
output (cross-attention). Norms, MLP and positional encodings are the GPT's (`blocks.py`).

Masks are boolean and True where a query may attend. Sequences are padded on the right, so
causal attention already keeps real target tokens from seeing the padding after them, and
only the source needs a padding mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models.base import LanguageModel, position_encoding
from gptlab.models.blocks import MLP, RopeTables, apply_rotary, make_norm, normalize_heads
from gptlab.models.dropout import Dropout
from gptlab.models.fused_loss import IGNORE_INDEX


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs)."""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C)."""
    B, nh, T, hs = x.shape
    return x.transpose(1, 2).contiguous().view(B, T, nh * hs)


def padding_mask(src_mask: torch.Tensor) -> torch.Tensor:
    """Source mask (B, S), True at real tokens -> attention mask (B, 1, 1, S) for any query."""
    return src_mask[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention of the queries of x over given keys and values: self-attention
    when they come from x itself, cross-attention when they come from the encoder's output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C = config.embed_dim
        self.n_heads = config.n_heads
        self.qk_norm_eps = config.norm_eps if config.qk_norm else None  # None: no QK-norm
        self.dropout = config.dropout
        self.query = nn.Linear(C, C, bias=config.bias)
        self.key_value = nn.Linear(C, 2 * C, bias=config.bias)  # k and v at once
        self.proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def keys_values(self, source: torch.Tensor, rope: RopeTables | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of source (B, S, C), each (B, nh, S, hs); RoPE rotates the keys."""
        k, v = (split_heads(t, self.n_heads) for t in self.key_value(source).chunk(2, dim=-1))
        if self.qk_norm_eps is not None:
            k = normalize_heads(k, self.qk_norm_eps)
        return (apply_rotary(k, rope) if rope is not None else k), v

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        """Attend from x (B, T, C) over keys/values (B, nh, S, hs) -> (B, T, C)."""
        q = split_heads(self.query(x), self.n_heads)  # (B, nh, T, hs)
        if self.qk_norm_eps is not None:
            q = normalize_heads(q, self.qk_norm_eps)
        if rope is not None:
            q = apply_rotary(q, rope)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.resid_dropout(self.proj(merge_heads(y)))  # (B, T, C)


class EncoderLayer(nn.Module):
    """x + self_attn(norm(x)) over the real source tokens, then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.self_attn = Attention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
        h = self.norm_1(x)
        k, v = self.self_attn.keys_values(h, rope)
        x = x + self.self_attn(h, k, v, mask=mask, rope=rope)  # (B, S, C)
        return x + self.mlp(self.norm_2(x))


@dataclass
class LayerCache:
    """One decoder layer's keys and values: of the encoder output (fixed), and of the target
    tokens decoded so far (grows by one position per step)."""

    memory_keys: torch.Tensor  # (B, nh, S, hs)
    memory_values: torch.Tensor
    keys: torch.Tensor | None = None  # (B, nh, T_past, hs)
    values: torch.Tensor | None = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, e.g. the beams that survived a search step."""
        for name in ("memory_keys", "memory_values", "keys", "values"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))


class DecoderLayer(nn.Module):
    """x + causal self_attn(norm(x)), then x + cross_attn(norm(x), encoder output), then x + mlp."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.self_attn = Attention(config)
        self.norm_2 = make_norm(config)
        self.cross_attn = Attention(config)
        self.norm_3 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: LayerCache, memory_mask: torch.Tensor, rope: RopeTables | None
    ) -> torch.Tensor:
        """x (B, T, C) are the target positions after those already in cache.keys (appended to)."""
        h = self.norm_1(x)
        k, v = self.self_attn.keys_values(h, rope)  # (B, nh, T, hs)
        past = 0 if cache.keys is None else cache.keys.size(2)
        if past:
            k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)  # (B, nh, past+T, hs)
        cache.keys, cache.values = k, v
        T = x.size(1)
        if past == 0:
            x = x + self.self_attn(h, k, v, is_causal=T > 1, rope=rope)
        else:  # new position t may see every cached one and the new ones up to itself
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past) if T > 1 else None
            x = x + self.self_attn(h, k, v, mask=mask, rope=rope)
        x = x + self.cross_attn(self.norm_2(x), cache.memory_keys, cache.memory_values, mask=memory_mask)
        return x + self.mlp(self.norm_3(x))  # (B, T, C)


@dataclass
class DecoderState:
    """Everything incremental decoding keeps between steps: the source mask, each layer's
    cache, and how many target positions were decoded."""

    memory_mask: torch.Tensor  # (B, 1, 1, S)
    layers: list[LayerCache]
    length: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and repeat) rows `index` (B',) of the batch in every cache."""
        self.memory_mask = self.memory_mask.index_select(0, index)
        for layer in self.layers:
            layer.reorder(index)


class Transformer(LanguageModel):
    """Source ids -> encoder -> memory; target ids + memory -> decoder -> next-token logits."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        V, C = config.tgt_vocab_size, config.embed_dim
        self.tgt_embed = nn.Embedding(V, C)
        self.src_embed = self.tgt_embed if config.shared_embeddings else nn.Embedding(V, C)
        # Learned tables are one per stack (each its own length); fixed encodings serve both.
        if config.pos_encoding == "learned":
            self.src_pos, self.rotary = position_encoding(config, config.source_len)
            self.tgt_pos, _ = position_encoding(config, config.seq_len)
        else:
            self.src_pos, self.rotary = position_encoding(config, max(config.seq_len, config.source_len))
            self.tgt_pos = self.src_pos
        self.drop = Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_norm = make_norm(config)
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.decoder_norm = make_norm(config)
        self.lm_head = self.output_head(self.tgt_embed)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Embeddings are multiplied by sqrt(C) (as in the paper), so tokens start at unit scale,
        # like the sinusoids added to them.
        for table in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(table.weight, mean=0.0, std=self.config.embed_dim**-0.5)
        self.scale_residual_writes(self.config.encoder_layers + self.config.decoder_layers)

    def _embed(
        self, ids: torch.Tensor, table: nn.Embedding, positions: nn.Module | None, start_pos: int
    ) -> tuple[torch.Tensor, RopeTables | None]:
        """Scaled token embeddings plus absolute positions (B, T, C), and the RoPE tables."""
        T = ids.size(1)
        x = table(ids) * math.sqrt(self.config.embed_dim)  # (B, T, C)
        if positions is not None:
            x = x + positions(T, start_pos)
        rope = self.rotary(T, start_pos) if self.rotary is not None else None
        return self.drop(x), rope

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, C) for source ids src (B, S); src_mask (B, S) is True at real tokens."""
        if src.size(1) > self.config.source_len:
            raise GptlabError(
                f"a source of {src.size(1)} tokens exceeds max_source_len={self.config.source_len}; truncate it"
            )
        x, rope = self._embed(src, self.src_embed, self.src_pos, 0)
        mask = padding_mask(src_mask)
        for layer in self.encoder:
            x = layer(x, mask, rope)
        return self.encoder_norm(x)

    def start_decoding(self, memory: torch.Tensor, src_mask: torch.Tensor) -> DecoderState:
        """A fresh decoder state: the encoder output's keys and values, computed once per layer."""
        layers = [LayerCache(*layer.cross_attn.keys_values(memory)) for layer in self.decoder]
        return DecoderState(padding_mask(src_mask), layers)

    def decode(self, tgt: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """Logits (B, T, V) for the target ids tgt (B, T) that follow the state's positions;
        the state grows by T positions."""
        T = tgt.size(1)
        if state.length + T > self.config.seq_len:
            raise GptlabError(
                f"target positions up to {state.length + T} exceed the model's seq_len={self.config.seq_len}"
            )
        x, rope = self._embed(tgt, self.tgt_embed, self.tgt_pos, state.length)
        for layer, cache in zip(self.decoder, state.layers):
            x = layer(x, cache, state.memory_mask, rope)
        state.length += T
        return self.lm_head(self.decoder_norm(x))  # (B, T, V)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for decoder inputs tgt (B, T) given sources src (B, S).

        src_mask (B, S) is True at real source tokens (default: all). With targets (B, T), also
        the mean cross-entropy over positions whose target is not IGNORE_INDEX.
        """
        if src_mask is None:
            src_mask = torch.ones_like(src, dtype=torch.bool)
        memory = self.encode(src, src_mask)
        logits = self.decode(tgt, self.start_decoding(memory, src_mask))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
        )
        return logits, loss

    # ---- sizes and costs ---------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters, a shared matrix counted once; non_embedding=True leaves out the
        token and position tables and the output head."""
        if non_embedding:
            stacks = [self.encoder, self.encoder_norm, self.decoder, self.decoder_norm]
            return sum(p.numel() for module in stacks for p in module.parameters())
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """Training FLOPs per (source or target) token, roughly: 6 per matmul weight on the
        token's path, half of them in each stack, plus the attention scores (PaLM, appendix B)."""
        cfg = self.config
        matmul_weights = self.num_params(non_embedding=True) // 2 + self.lm_head.weight.numel() // 2
        attention = 12 * cfg.embed_dim * (cfg.encoder_layers * cfg.source_len + 2 * cfg.decoder_layers * cfg.seq_len)
        return 6 * matmul_weights + attention // 2
