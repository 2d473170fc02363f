"""Completions as the HTTP API reports them: generation's token loop, plus what the API says
about each choice, how many tokens it took and why it ended.

`generation.stream_batch` yields text only; the API also owes `finish_reason` and token
counts, and must stop when a client hangs up, so this module drives the same engine
(`generate_token_ids` + `TextStream`) with that bookkeeping. The texts are the same as
`generation.generate` gives for the same prompt, settings and seed (tests/test_serve.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal


from gptlab.config import SampleConfig
from gptlab.generation import banned_ids, generate_token_ids, seeded_generator
from gptlab.models import GPT
from gptlab.text_stream import TextStream
from gptlab.tokenizers.base import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Piece:
    """New text of one choice (whole characters)."""

    index: int  # the choice: sample s of prompt p is index p * n + s, as in OpenAI's API
    text: str


@dataclass(frozen=True)
class ChoiceEnd:
    """A choice is complete: "stop" (<EOS> or a stop string) or "length" (max_tokens reached)."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int


def run_completions(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    cfg: SampleConfig,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[Piece | ChoiceEnd]:
    """Continue each prompt (token ids, 1 to seq_len of them) cfg.num_samples times in one batch.

    Yields each choice's text pieces as they become certain, then its ChoiceEnd; every choice
    ends exactly once, unless `cancelled()` turns true, which stops the loop at the next step.
    """
    rows = [list(ids) for ids in prompt_ids for _ in range(cfg.num_samples)]
    streams = [TextStream(tokenizer, ids, cfg.stop) for ids in rows]
    produced = [0] * len(rows)  # tokens generated per row, the one that ended it included
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
                if token == tokenizer.eos_id:
                    piece, ended[row] = streams[row].finish(), "stop"
                else:
                    piece = streams[row].push(token)
                    ended[row] = "stop" if streams[row].stopped else None
                if piece:
                    yield Piece(row, piece)
                if ended[row] is not None:
                    yield ChoiceEnd(row, "stop", produced[row])
            if all(reason is not None for reason in ended):
                return
    finally:
        steps.close()
    for row, stream in enumerate(streams):
        if ended[row] is None:
            piece = stream.finish()
            if piece:
                yield Piece(row, piece)
            yield ChoiceEnd(row, "length", produced[row])
