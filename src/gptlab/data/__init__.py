"""Text -> token shards on disk -> batches of windows for training."""

from gptlab.data.datasets import TokenDataset, iterate_batches, num_batches, window_offset
from gptlab.data.prepare import DEFAULT_SHARD_TOKENS, default_workers, prepare, read_meta, resolve_data

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "TokenDataset",
    "default_workers",
    "iterate_batches",
    "num_batches",
    "prepare",
    "read_meta",
    "resolve_data",
    "window_offset",
]
