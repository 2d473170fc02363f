"""Sampling text from a trained GPT: the token loop with its KV cache, and text out of it.

The model stays a plain nn.Module. `generate_token_ids` is the engine (batched prompts, one
prefill, then one token per step); `stream_batch`, `stream_text` and `generate` turn its ids
into text pieces, with stop strings and whole characters only (text_stream.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT, KVCache
from gptlab.sampling import sample_next
from gptlab.text_stream import TextStream
from gptlab.tokenizers.base import Tokenizer

Notice = Callable[[str], None]


@torch.inference_mode()
def generate_token_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    cfg: SampleConfig,
    pad_id: int,
    banned: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[int]]:
    """Yield the next token id of every row, once per step, for cfg.max_new_tokens steps.

    Prompts (each at most seq_len ids) may differ in length: they are left padded with pad_id,
    and padding never changes a row's result. `banned` (V,) bool marks ids never to produce.
    The caller stops early (all rows finished) by closing the iterator; rows go on otherwise.
    """
    seq_len = model.config.seq_len
    # When the text outgrows the context, the cache restarts from the last `keep` tokens with
    # a fresh prefill. A rolling cache (overwrite the oldest slot) would be cheaper but inexact:
    # its keys hold absolute positions past seq_len, and in deeper layers the context of tokens
    # that have left the window. Re-prefilling is exact: keep = seq_len is the no-cache sliding
    # window (a full forward per step); the default seq_len // 2 costs one prefill per seq_len // 2 tokens.
    keep = cfg.window_keep or max(1, seq_len // 2)
    if keep > seq_len:
        raise GptlabError(f"window_keep={keep} exceeds the model's context (seq_len={seq_len}); lower it")
    if not prompts or any(not ids for ids in prompts) or max(len(ids) for ids in prompts) > seq_len:
        raise GptlabError(f"every prompt needs 1 to seq_len={seq_len} token ids; crop or fill it")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(ids) for ids in prompts)
    pad = torch.tensor([longest - len(ids) for ids in prompts], device=device)  # (B,)
    # Every slot's token, prompt and generated: the source of a re-prefill.
    tokens = torch.full((B, longest + cfg.max_new_tokens), pad_id, dtype=torch.long)  # (B, total)
    for row, ids in enumerate(prompts):
        tokens[row, longest - len(ids) : longest] = torch.as_tensor(ids)
    tokens = tokens.to(device)
    seen = None  # (B, V) bool: which ids each row's text holds, for the repetition penalty
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.tgt_vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, tokens[:, :longest], True)  # <PAD> marked too: harmless, never wanted

    cache = model.new_kv_cache(B, max_len=min(seq_len, longest + cfg.max_new_tokens), pad=pad)
    logits = _last_logits(model, tokens[:, :longest], cache)  # (B, V)
    end = longest  # slots filled in `tokens`
    for step in range(cfg.max_new_tokens):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        next_ids = sample_next(logits, cfg, seen, generator)  # (B,), still on the device
        tokens[:, end] = next_ids
        end += 1
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        yield next_ids.tolist()  # the step's only host-device sync
        if step + 1 == cfg.max_new_tokens:
            return
        if cache.length < cache.max_len:  # max_len < seq_len only if the text never outgrows it
            logits = _last_logits(model, next_ids[:, None], cache)
        else:
            cache.reset(pad=(pad - (end - keep)).clamp(min=0))  # rows' padding left in the window
            logits = _last_logits(model, tokens[:, end - keep : end], cache)


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run idx (B, T) through the model after the cached slots; logits of the last slot (B, V)."""
    logits, _ = model(idx, kv_cache=cache, last_only=True)  # (B, 1, V)
    return logits[:, -1, :]


def stream_batch(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: SampleConfig,
    notice: Notice = print,
) -> Iterator[tuple[int, str]]:
    """Continue every prompt `cfg.num_samples` times, all rows in one batch; yield (row, piece).

    Row r continues prompts[r // cfg.num_samples]. A row ends at <EOS>, at a stop string (not
    included) or after cfg.max_new_tokens tokens; pieces are whole characters.
    """
    device = next(model.parameters()).device
    prompt_ids = [prompt_to_ids(prompt, tokenizer, model.config.seq_len, notice) for prompt in prompts]
    rows = [ids for ids in prompt_ids for _ in range(cfg.num_samples)]
    streams = [TextStream(tokenizer, ids, cfg.stop) for ids in rows]
    finished = [False] * len(rows)
    banned = banned_ids(model.config.tgt_vocab_size, tokenizer, device)
    steps = generate_token_ids(model, rows, cfg, tokenizer.pad_id, banned, seeded_generator(cfg.seed, device))
    try:
        for next_ids in steps:
            for row, token in enumerate(next_ids):
                if finished[row]:
                    continue
                if token == tokenizer.eos_id:
                    finished[row] = True
                    piece = streams[row].finish()
                else:
                    piece = streams[row].push(token)
                    finished[row] = streams[row].stopped
                if piece:
                    yield row, piece
            if all(finished):
                break
    finally:
        steps.close()
    for row, stream in enumerate(streams):
        piece = "" if finished[row] else stream.finish()
        if piece:
            yield row, piece


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    notice: Notice = print,
) -> Iterator[str]:
    """Yield one continuation of `prompt` as text pieces, as soon as they are certain
    (cfg.num_samples is ignored; `cfg.seed` makes it reproducible)."""
    for _, piece in stream_batch(model, tokenizer, [prompt], cfg.model_copy(update={"num_samples": 1}), notice):
        yield piece


def generate(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str = "",
    cfg: SampleConfig | None = None,
    notice: Notice = print,
) -> list[str]:
    """`cfg.num_samples` continuations of `prompt` (without the prompt itself), as one batch."""
    cfg = cfg or SampleConfig()
    texts = [""] * cfg.num_samples
    for row, piece in stream_batch(model, tokenizer, [prompt], cfg, notice):
        texts[row] += piece
    return texts


def prompt_to_ids(prompt: str, tokenizer: Tokenizer, seq_len: int, notice: Notice = print) -> list[int]:
    """Encode the prompt; an empty prompt starts a new document (<EOS>), a long one keeps its tail."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    if len(ids) > seq_len:
        notice(f"prompt is {len(ids)} tokens; keeping its last {seq_len} (the model's context length)")
        ids = ids[-seq_len:]
    return ids


def banned_ids(model_vocab: int, tokenizer: Tokenizer, device: torch.device) -> torch.Tensor:
    """Ids the model must never produce (V,) bool: rows beyond the tokenizer's vocabulary, <PAD>, <BOS>."""
    banned = torch.zeros(model_vocab, dtype=torch.bool, device=device)
    banned[tokenizer.vocab_size :] = True
    banned[[tokenizer.pad_id, tokenizer.bos_id]] = True
    return banned


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A random generator for sampling, seeded with `seed` (None: torch's global one)."""
    if seed is None:
        return None
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"seeded sampling is not supported on {device.type}; drop the seed or use cpu/cuda")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
