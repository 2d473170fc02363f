"""Generation for every model kind: sampling text from a GPT (gpt.py: the KV-cache token loop,
sampling.py: the logits processors, text_stream.py: whole characters and stop strings out of the
ids) and decoding sources into targets with an encoder-decoder Transformer (seq2seq.py: greedy
and beam search). Below training/ and serve/ in the import order: both use it."""

from gptlab.generation.gpt import (
    FinishReason,
    Piece,
    SampleEnd,
    answer_end_ids,
    generate,
    generate_token_ids,
    prompt_to_ids,
    ready_for_generation,
    sample_events,
    seeded_generator,
    stream_batch,
    stream_text,
    window_keep,
)
from gptlab.generation.sampling import banned_ids
from gptlab.generation.seq2seq import beam_search, greedy_decode, translate
from gptlab.generation.text_stream import TextStream

__all__ = [
    "FinishReason",
    "Piece",
    "SampleEnd",
    "TextStream",
    "answer_end_ids",
    "banned_ids",
    "beam_search",
    "generate",
    "generate_token_ids",
    "greedy_decode",
    "prompt_to_ids",
    "ready_for_generation",
    "sample_events",
    "seeded_generator",
    "stream_batch",
    "stream_text",
    "translate",
    "window_keep",
]
