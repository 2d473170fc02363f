"""Turning sources into targets with a trained encoder-decoder Transformer: greedy and beam search.

Both encode the source once and then feed the decoder one token per step, reusing the keys
and values of earlier target positions (the decoder's KV cache) and of the encoder output.
"""

from __future__ import annotations

import warnings

import torch

from gptlab.data.pairs import pad, pad_mask
from gptlab.errors import GptlabError
from gptlab.generation.sampling import banned_ids
from gptlab.models.transformer import Transformer
from gptlab.tokenizers.base import Tokenizer


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    src: torch.Tensor,
    src_mask: torch.Tensor,
    tokenizer: Tokenizer,
    max_len: int | None = None,
) -> list[list[int]]:
    """The most likely next token at each step, for a batch of sources src (B, S) with mask (B, S).

    Returns each row's ids before its <EOS>, at most max_len (default: the model's seq_len) ids.
    """
    max_len = min(max_len or model.config.seq_len, model.config.seq_len)
    B = src.size(0)
    banned = banned_ids(model.config.tgt_vocab_size, tokenizer, src.device)
    state = model.start_decoding(model.encode(src, src_mask), src_mask)
    token = torch.full((B, 1), tokenizer.bos_id, dtype=torch.long, device=src.device)  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    steps = []
    for _ in range(max_len):
        logits = model.decode(token, state)[:, -1].masked_fill(banned, float("-inf"))  # (B, V)
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        steps.append(token)
        done |= token.squeeze(1) == tokenizer.eos_id
        if done.all():
            break
    rows = torch.cat(steps, dim=1).tolist()  # (B, steps)
    return [row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row for row in rows]


@torch.no_grad()
def beam_search(
    model: Transformer,
    source_ids: list[int],
    tokenizer: Tokenizer,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[int]:
    """The best target for one source by beam search: ids before <EOS>.

    Keeps the `beam_size` best unfinished hypotheses by summed log-probability. A hypothesis
    that ranks among the best `beam_size` when it ends (<EOS>) is finished, scored as
    logprob / length ** length_penalty (length counts <EOS>; 0 = no normalisation, higher values
    favour longer targets); the search stops once `beam_size` are finished or at max_len, and
    the best finished one wins (the best unfinished one if none ended). With beam_size 1 this
    is exactly greedy decoding.
    """
    if beam_size < 1:
        raise GptlabError(f"beam_size must be at least 1, got {beam_size}")
    if not source_ids:
        raise GptlabError("the source is empty; pass some text to translate")
    K, device = beam_size, next(model.parameters()).device
    max_len = min(max_len or model.config.seq_len, model.config.seq_len)
    banned = banned_ids(model.config.tgt_vocab_size, tokenizer, device)
    src = torch.tensor([source_ids], dtype=torch.long, device=device)  # (1, S)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    state = model.start_decoding(model.encode(src, src_mask), src_mask)
    state.reorder(torch.zeros(K, dtype=torch.long, device=device))  # K copies of the encoded source
    beams = torch.full((K, 1), tokenizer.bos_id, dtype=torch.long, device=device)  # (K, t + 1)
    scores = torch.full((K,), float("-inf"), device=device)
    scores[0] = 0.0  # identical beams at the start: expand only one of them
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, max_len + 1):
        logits = model.decode(beams[:, -1:], state)[:, -1].float()  # (K, V)
        logprobs = logits.masked_fill(banned, float("-inf")).log_softmax(dim=-1)
        V = logprobs.size(-1)
        candidates = (scores[:, None] + logprobs).flatten()  # (K * V,)
        top_scores, top_ids = candidates.topk(min(2 * K, candidates.numel()))  # enough to refill K beams
        keep_beams, keep_tokens, keep_scores = [], [], []
        for rank, (score, flat_id) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
            beam, token = divmod(flat_id, V)
            if score == float("-inf"):
                break
            if token == tokenizer.eos_id:
                if rank < K:
                    finished.append((score / step**length_penalty, beams[beam, 1:].tolist()))
            elif len(keep_beams) < K:
                keep_beams.append(beam)
                keep_tokens.append(token)
                keep_scores.append(score)
        if len(finished) >= K or not keep_beams:
            break
        while len(keep_beams) < K:  # fewer live candidates than beams: pad with hopeless copies
            keep_beams.append(keep_beams[0])
            keep_tokens.append(keep_tokens[0])
            keep_scores.append(float("-inf"))
        index = torch.tensor(keep_beams, device=device)
        state.reorder(index)
        tokens = torch.tensor(keep_tokens, device=device)[:, None]
        beams = torch.cat([beams.index_select(0, index), tokens], dim=1)
        scores = torch.tensor(keep_scores, device=device)
    if finished:
        return max(finished, key=lambda item: item[0])[1]
    return beams[int(scores.argmax()), 1:].tolist()


def encode_sources(
    sources: list[str], tokenizer: Tokenizer, max_source_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded source ids (B, S) and mask (B, S) on `device`, cut to max_source_len; also how many were cut."""
    ids = [tokenizer.encode(source) for source in sources]
    if any(not row for row in ids):
        raise GptlabError("a source is empty; pass some text to translate")
    truncated = sum(len(row) > max_source_len for row in ids)
    ids = [row[:max_source_len] for row in ids]
    return pad(ids, tokenizer.pad_id).to(device), pad_mask(ids).to(device), truncated


def translate(
    model: Transformer,
    tokenizer: Tokenizer,
    sources: list[str],
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[str]:
    """Target texts for source texts: greedy (batched) when beam_size is 1, else beam search.

    Sources longer than the model's max_source_len are truncated with a warning.
    """
    device = next(model.parameters()).device
    src, src_mask, truncated = encode_sources(sources, tokenizer, model.config.source_len, device)
    if truncated:
        warnings.warn(
            f"{truncated} source(s) longer than max_source_len={model.config.source_len} tokens were truncated",
            stacklevel=2,
        )
    if beam_size == 1:
        outputs = greedy_decode(model, src, src_mask, tokenizer, max_len)
    else:
        outputs = [
            beam_search(model, row[mask].tolist(), tokenizer, beam_size, length_penalty, max_len)
            for row, mask in zip(src, src_mask)
        ]
    return [tokenizer.decode(ids) for ids in outputs]
