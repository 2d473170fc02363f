"""What the GPT and the encoder-decoder Transformer share: the config check, the positional
encodings, the output head, the depth-scaled initialisation and the optimizer's parameter groups."""

from __future__ import annotations

import math

from torch import nn

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models.blocks import LearnedPositions, RotaryEmbedding, SinusoidalPositions

AbsolutePositions = LearnedPositions | SinusoidalPositions


class LanguageModel(nn.Module):
    """Base of gptlab's models: holds the config, whose tgt_vocab_size must be set."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.tgt_vocab_size is None:
            raise GptlabError("ModelConfig.tgt_vocab_size is None; set it to the tokenizer's vocab_size (or more)")
        self.config = config

    def output_head(self, table: nn.Embedding) -> nn.Linear:
        """The (C -> V) head; with tie_embeddings it shares its matrix with the token table `table`."""
        head = nn.Linear(self.config.embed_dim, self.config.tgt_vocab_size, bias=False)
        if self.config.tie_embeddings:
            head.weight = table.weight  # one matrix reads tokens in and writes logits out
        return head

    def scale_residual_writes(self, depth: int) -> None:
        """GPT-2: re-draw the projections that write into the residual stream (2 per layer of
        `depth`) with a smaller std, so that its variance does not grow with depth; with
        zero_init_projections, start them at zero instead (modded-nanogpt), so that every block
        begins as the identity and learns what to add."""
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                if self.config.zero_init_projections:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for AdamW: weight decay on matrices, none on biases and norm gains.

        Embedding tables are matrices and decay too (as in GPT-2 / nanoGPT): a tied table is
        also the output head's weight, and decaying vectors would only pull gains towards zero.
        Frozen parameters (requires_grad False, e.g. a base model under LoRA adapters) are left out.
        """
        params = [p for p in self.parameters() if p.requires_grad]  # each tied matrix once
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


def position_encoding(config: ModelConfig, length: int) -> tuple[AbsolutePositions | None, RotaryEmbedding | None]:
    """The encodings of config.pos_encoding for `length` positions: an absolute table added to
    the embeddings (learned or sinusoidal), or RoPE's rotation, which acts inside attention instead."""
    if config.pos_encoding == "learned":
        return LearnedPositions(length, config.embed_dim), None
    if config.pos_encoding == "sinusoidal":
        return SinusoidalPositions(length, config.embed_dim), None
    return None, RotaryEmbedding(config.head_dim, length, config.rope_theta)
