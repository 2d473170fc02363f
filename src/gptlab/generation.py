"""Sampling text from a trained GPT: the logits processors and the token-by-token loop.

The model stays a plain nn.Module; everything about choosing the next token lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def filter_logits(logits: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to `logits` (B, V); returns new logits."""
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.size(-1):
        kth_best = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token id per row of `logits` (B, V) -> (B,)."""
    if cfg.greedy or cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float(), cfg), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    cfg: SampleConfig,
    tokenizer: Tokenizer,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time, stopping at <EOS> or after cfg.max_new_tokens.

    Without a KV cache every step runs the model over the last `seq_len` tokens.
    """
    device = next(model.parameters()).device
    seq_len = model.config.seq_len
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    banned = _banned_ids(model.config.tgt_vocab_size, tokenizer, device)
    for _ in range(cfg.max_new_tokens):
        logits, _ = model(ids[:, -seq_len:])
        logits = logits[:, -1, :].masked_fill(banned, float("-inf"))  # (1, V)
        token = next_tokens(logits, cfg, generator)  # (1,)
        if token.item() == tokenizer.eos_id:
            return
        yield int(token.item())
        ids = torch.cat([ids, token[:, None]], dim=1)


def _banned_ids(model_vocab: int, tokenizer: Tokenizer, device: torch.device) -> torch.Tensor:
    """Ids the model must never produce: rows beyond the tokenizer's vocabulary, and <PAD>/<BOS>."""
    banned = torch.zeros(model_vocab, dtype=torch.bool, device=device)
    banned[tokenizer.vocab_size :] = True
    banned[[tokenizer.pad_id, tokenizer.bos_id]] = True
    return banned


def prompt_to_ids(
    prompt: str, tokenizer: Tokenizer, seq_len: int, notice: Callable[[str], None] = print
) -> list[int]:
    """Encode the prompt; an empty prompt starts a new document (<EOS>), a long one keeps its tail."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    if len(ids) > seq_len:
        notice(f"prompt is {len(ids)} tokens; keeping its last {seq_len} (the model's context length)")
        ids = ids[-seq_len:]
    return ids


def stream_text(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    cfg: SampleConfig,
    notice: Callable[[str], None] = print,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as they are whole characters.

    One sample; `cfg.seed` makes it reproducible.
    """
    generator = _generator(cfg.seed, next(model.parameters()).device)
    prompt_ids = prompt_to_ids(prompt, tokenizer, model.config.seq_len, notice)
    new_ids = generate_ids(model, prompt_ids, cfg, tokenizer, generator)
    yield from _decode_stream(new_ids, tokenizer, context=prompt_ids[-8:])


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str = "",
    cfg: SampleConfig | None = None,
    notice: Callable[[str], None] = print,
) -> list[str]:
    """`cfg.num_samples` continuations of `prompt` (without the prompt itself)."""
    cfg = cfg or SampleConfig()
    if cfg.num_samples == 1:
        return ["".join(stream_text(model, tokenizer, prompt, cfg, notice))]
    # Later samples use seeds derived from the first, so one seed reproduces the whole set.
    seeds = [None if cfg.seed is None else cfg.seed + i for i in range(cfg.num_samples)]
    return [
        "".join(stream_text(model, tokenizer, prompt, cfg.model_copy(update={"seed": s}), notice))
        for s in seeds
    ]


def _decode_stream(ids: Iterator[int], tokenizer: Tokenizer, context: list[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, never splitting a UTF-8 character.

    A byte-level token can end in the middle of a character; its decoded text then ends with
    U+FFFD, which we hold back until the following tokens complete the character. The last
    few prompt ids are decoded along, because some tokenizers (SentencePiece) render a token
    differently at the start of a text (its leading space).
    """
    prefix = len(tokenizer.decode(context))
    produced = list(context)
    emitted = 0
    for token in ids:
        produced.append(token)
        stable = tokenizer.decode(produced)[prefix:].rstrip(REPLACEMENT_CHAR)
        if len(stable) > emitted:
            yield stable[emitted:]
            emitted = len(stable)
    rest = tokenizer.decode(produced)[prefix + emitted :]
    if rest:
        yield rest


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"seeded sampling is not supported on {device.type}; drop --seed or use cpu/cuda")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
