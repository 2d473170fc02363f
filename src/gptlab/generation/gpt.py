"""Sampling text from a trained GPT: the token loop with its KV cache, and text out of it.

The model stays a plain nn.Module. `generate_token_ids` is the engine (batched prompts, one
prefill, then one token per step); `sample_events` turns its ids into text pieces, with stop
strings and whole characters only (text_stream.py), and says how and when each sample ended
(what the HTTP API reports); `stream_batch`, `stream_text` and `generate` give the text alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation.sampling import banned_ids, is_greedy, sample_next
from gptlab.generation.text_stream import TextStream
from gptlab.models import GPT, KVCache
from gptlab.models.int8 import use_int8_linears
from gptlab.models.layout_choice import choose_layouts
from gptlab.models.matvec import use_matvec_linears
from gptlab.models.native_layout import choose_memory_orders
from gptlab.models.native_step import NativeDecodeStep, decode_step, decodes_natively
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import CHAT_TOKENS, has_chat_template

Notice = Callable[[str], None]
FinishReason = Literal["stop", "length"]


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
    and padding does not change a row's result while the batch's longest text fits in seq_len.
    Past that, the rows move their window together (below), so a shorter row may keep less context
    than it would alone, unless window_keep = seq_len. `banned` (V,) bool marks ids never to produce.
    The caller stops early (all rows finished) by closing the iterator; rows go on otherwise.
    """
    seq_len = model.config.seq_len
    # When the text outgrows the context, the cache restarts from the last `keep` tokens with
    # a fresh prefill. A rolling cache (overwrite the oldest slot) would be cheaper but inexact:
    # its keys hold absolute positions past seq_len, and in deeper layers the context of tokens
    # that have left the window. Re-prefilling is exact: keep = seq_len is the no-cache sliding
    # window (a full forward per step); the default seq_len // 2 costs one prefill per seq_len // 2 tokens.
    keep = window_keep(cfg, seq_len)
    if model.training and model.config.dropout > 0:
        warnings.warn("the model is in training mode, so dropout changes what it generates; call model.eval() first")  # noqa: B028 (a stacklevel would move where it is reported)
    if not prompts or any(not ids for ids in prompts) or max(len(ids) for ids in prompts) > seq_len:
        raise GptlabError(f"every prompt needs 1 to seq_len={seq_len} token ids; crop or fill it")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(ids) for ids in prompts)
    pad = torch.tensor([longest - len(ids) for ids in prompts], device=device)  # (B,)
    # Every row's tokens, prompt and generated: the source of a re-prefill. Python lists: a step
    # appends to them for less than a tensor write costs.
    texts = [[pad_id] * (longest - len(ids)) + list(ids) for ids in prompts]
    padded = torch.tensor(texts, device=device)  # (B, longest)
    seen = None  # (B, V) bool: which ids each row's text holds, for the repetition penalty
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.tgt_vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, padded, True)  # <PAD> marked too: harmless, never wanted

    cache = model.new_kv_cache(B, max_len=min(seq_len, longest + cfg.max_new_tokens), pad=pad)
    logits = _last_logits(model, padded, cache)  # (B, V)
    # One token a row: the forward pass in fewer operations (models/decode_step.py), or in one call
    # to C where it can (models/native_step.py); in training mode (dropout), or for another kind of
    # model, the forward pass itself.
    one_token = decode_step(model) if isinstance(model, GPT) and not model.training else None
    # Greedy without a repetition penalty needs only each step's largest logit: the C step finds it
    # as it writes them, which spares PyTorch's operations on the logits (a tenth of a small model's step).
    picks_in_step = isinstance(one_token, NativeDecodeStep) and is_greedy(cfg) and seen is None
    next_ids = None  # (B,) when the step chose them; else they are sampled from `logits`
    for step in range(cfg.max_new_tokens):
        if next_ids is None:
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            next_ids = sample_next(logits, cfg, seen, generator)  # (B,), still on the device
        if seen is not None:
            seen.scatter_(1, next_ids[:, None], True)
        picked = next_ids.tolist()  # the step's only host-device sync
        for text, token in zip(texts, picked):
            text.append(token)
        yield picked
        if step + 1 == cfg.max_new_tokens:
            return
        if cache.length < cache.max_len:  # max_len < seq_len only if the text never outgrows it
            if picks_in_step:
                next_ids = one_token.greedy(next_ids, cache, banned)
            elif one_token is not None:
                logits, next_ids = one_token(next_ids, cache), None
            else:
                logits, next_ids = _last_logits(model, next_ids[:, None], cache), None
        else:
            dropped = len(texts[0]) - keep  # every row's text is as long: prompts were padded to one length
            cache.reset(pad=(pad - dropped).clamp(min=0))  # rows' padding left in the window
            window = torch.tensor([text[-keep:] for text in texts], device=device)
            logits, next_ids = _last_logits(model, window, cache), None


def window_keep(cfg: SampleConfig, seq_len: int) -> int:
    """The tokens a window restart keeps: cfg.window_keep, by default seq_len // 2; GptlabError
    when it exceeds seq_len (callers check before printing anything)."""
    keep = cfg.window_keep or max(1, seq_len // 2)
    if keep > seq_len:
        raise GptlabError(f"window_keep={keep} exceeds the model's context (seq_len={seq_len}); lower it")
    return keep


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run idx (B, T) through the model after the cached slots; logits of the last slot (B, V)."""
    logits, _ = model(idx, kv_cache=cache, last_only=True)  # (B, 1, V)
    return logits[:, -1, :]


@dataclass(frozen=True)
class Piece:
    """New text of one sample (whole characters)."""

    index: int  # the row: sample s of prompt p is row p * num_samples + s
    text: str


@dataclass(frozen=True)
class SampleEnd:
    """A sample is complete: "stop" (<EOS> or a stop string) or "length" (max_new_tokens reached)."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int  # tokens generated, the one that ended the sample included


def sample_events(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    cfg: SampleConfig,
    cancelled: Callable[[], bool] = lambda: False,
    end_ids: Collection[int] = (),
) -> Iterator[Piece | SampleEnd]:
    """Continue each prompt (1 to seq_len token ids) cfg.num_samples times, all rows in one batch.

    Yields each row's text pieces as they become certain, then its SampleEnd; every row ends
    exactly once, unless `cancelled()` turns true (a client hung up), which stops at the next step.
    A row ends with "stop" at <EOS> or at any of `end_ids` (a chat's end-of-turn marker), which
    is not part of its text.
    """
    ends = {tokenizer.eos_id, *end_ids}
    rows = [list(ids) for ids in prompt_ids for _ in range(cfg.num_samples)]
    streams = [TextStream(tokenizer, ids, cfg.stop) for ids in rows]
    produced = [0] * len(rows)
    ended: list[FinishReason | None] = [None] * len(rows)
    device = next(model.parameters()).device
    banned = banned_ids(model.config.tgt_vocab_size, tokenizer, device)
    steps = generate_token_ids(model, rows, cfg, tokenizer.pad_id, banned, seeded_generator(cfg.seed, device))
    try:
        for next_ids in steps:
            if cancelled():
                return
            for row, token in enumerate(next_ids):
                if ended[row] is not None:
                    continue
                produced[row] += 1
                if token in ends:
                    piece, ended[row] = streams[row].finish(), "stop"
                else:
                    piece = streams[row].push(token)
                    ended[row] = "stop" if streams[row].stopped else None
                if piece:
                    yield Piece(row, piece)
                if ended[row] is not None:
                    yield SampleEnd(row, "stop", produced[row])
            if all(reason is not None for reason in ended):
                return
    finally:
        steps.close()
    for row, stream in enumerate(streams):
        if ended[row] is None:
            piece = stream.finish()
            if piece:
                yield Piece(row, piece)
            yield SampleEnd(row, "length", produced[row])


def answer_end_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that end a chat answer (sample_events' end_ids): the end-of-turn marker, and the
    role markers, with which the model would start another turn by itself. Empty without a chat template."""
    if not has_chat_template(tokenizer):
        return []
    specials = tokenizer.special_tokens
    return sorted(specials[token] for token in CHAT_TOKENS)


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
    prompt_ids = [prompt_to_ids(prompt, tokenizer, model.config.seq_len, notice) for prompt in prompts]
    for event in sample_events(model, tokenizer, prompt_ids, cfg):
        if isinstance(event, Piece):
            yield event.index, event.text


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


def ready_for_generation(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` in eval mode with its weights in `dtype`, laid out for decoding one token at a time.

    On CPU in float32, a GPT that the decoding step in C takes (gptlab.models.native_step, built
    here the first time) keeps nn.Linear layers, each matrix shape stored in the memory order in
    which whole native steps measured fastest (gptlab.models.native_layout; under half a second,
    and not at all for a model whose steps are too slow to time). Any other model's nn.Linear
    layers become MatVecLinears (gptlab.models.matvec) on the same parameters, and each matrix
    shape gets the way of computing one row's product that measured fastest on this machine
    (gptlab.models.layout_choice; a few milliseconds per shape, once per process). The results
    equal nn.Linear's up to float rounding. bf16 kernels prefer the usual layout. torch.qint8
    (`--dtype int8`, a GPT on CPU) replaces each nn.Linear by an Int8Linear (gptlab.models.int8):
    int8 weights, inputs quantized per row, decoded by the C step where it takes the model; that
    model is for generation only. Dropout layers with p = 0 are removed (one call less each per
    layer and token).
    The model is changed in place; in float types it still trains and saves as before.
    """
    on_cpu = next(model.parameters()).device.type == "cpu"
    if dtype == torch.qint8:
        if not isinstance(model, GPT):
            raise GptlabError("--dtype int8 is for GPT checkpoints; decode this Transformer in fp32 (or bf16)")
        if not on_cpu:
            raise GptlabError("--dtype int8 runs on CPUs only; load the model with --device cpu")
        model = model.float().eval()
        use_int8_linears(model)
    else:
        model = model.to(dtype).eval()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Dropout) and child.p == 0:
                setattr(parent, name, nn.Identity())
    if dtype == torch.float32 and on_cpu:
        if decodes_natively(model):
            choose_memory_orders(model)
        else:
            use_matvec_linears(model)
            choose_layouts(model)
    return model


def prompt_to_ids(prompt: str, tokenizer: Tokenizer, seq_len: int, notice: Notice = print) -> list[int]:
    """Encode the prompt; an empty prompt starts a new document (<EOS>), a long one keeps its tail."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    if len(ids) > seq_len:
        notice(f"prompt is {len(ids)} tokens; keeping its last {seq_len} (the model's context length)")
        ids = ids[-seq_len:]
    return ids


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A random generator for sampling, seeded with `seed` (None: torch's global one)."""
    if seed is None:
        return None
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"seeded sampling is not supported on {device.type}; drop the seed or use cpu/cuda")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
