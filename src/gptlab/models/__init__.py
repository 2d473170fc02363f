"""Model definitions: the GPT, the blocks it is built from, and the KV cache it decodes with."""

from gptlab.models.gpt import GPT
from gptlab.models.kv_cache import KVCache

__all__ = ["GPT", "KVCache"]
