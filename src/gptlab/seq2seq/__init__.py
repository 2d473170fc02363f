"""Encoder-decoder (sequence-to-sequence) Transformers: decoding sources into targets."""

from gptlab.seq2seq.decoding import beam_search, greedy_decode, translate

__all__ = ["beam_search", "greedy_decode", "translate"]
