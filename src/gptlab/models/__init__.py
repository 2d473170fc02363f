"""Model definitions: the GPT and the blocks it is built from."""

from gptlab.models.gpt import GPT

__all__ = ["GPT"]
