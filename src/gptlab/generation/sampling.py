"""Choosing the next token from the model's logits: the logits processors and the draw.

Every function works on a batch of rows, (B, V), on the logits' device, so that a generation
step never leaves the accelerator until the chosen ids are read.
"""

from __future__ import annotations

import torch

from gptlab.config import SampleConfig
from gptlab.tokenizers.base import Tokenizer

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019) on the tokens already in each row's text.

    logits (B, V); seen (B, V) bool. A positive logit is divided by the penalty and a negative
    one multiplied, so that penalty > 1 always makes a seen token less likely.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included), -inf elsewhere."""
    if k >= logits.size(-1):
        return logits
    kth_best = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_best, NEG_INF)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens
    whose probabilities sum to at least p; the most likely token always stays."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the tokens ranked above it already reach p.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): drop tokens whose probability is below min_p times
    that of the row's most likely token, so the cut adapts to how confident the model is."""
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, cfg: SampleConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The logits (B, V) after every processor `cfg` turns on, in float32."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if is_greedy(cfg):
        return logits  # the argmax is all that matters; the filters below keep it anyway
    # Shifted so that the largest is 0 first: a tiny temperature then sends the others to -inf
    # instead of overflowing the largest to inf (and the softmax to NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / cfg.temperature
    if cfg.top_k is not None:
        logits = keep_top_k(logits, cfg.top_k)
    if cfg.top_p is not None:
        logits = keep_top_p(logits, cfg.top_p)
    if cfg.min_p is not None and cfg.min_p > 0:
        logits = keep_min_p(logits, cfg.min_p)
    return logits


def banned_ids(model_vocab: int, tokenizer: Tokenizer, device: torch.device) -> torch.Tensor:
    """Ids the model must never produce (V,) bool: rows beyond the tokenizer's vocabulary, <PAD>, <BOS>."""
    banned = torch.zeros(model_vocab, dtype=torch.bool, device=device)
    banned[tokenizer.vocab_size :] = True
    banned[[tokenizer.pad_id, tokenizer.bos_id]] = True
    return banned


def is_greedy(cfg: SampleConfig) -> bool:
    return cfg.greedy or cfg.temperature == 0


def sample_next(
    logits: torch.Tensor,
    cfg: SampleConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of `logits` (B, V) -> (B,), on the logits' device."""
    logits = process_logits(logits, cfg, seen)
    if is_greedy(cfg):
        # max's indices are argmax's (the first of equal maxima), in half the time on a CPU row of 8192.
        return logits.max(dim=-1).indices
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
