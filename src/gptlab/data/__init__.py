"""Text -> token shards on disk -> batches of windows for training."""

from gptlab.data.datasets import TokenDataset, iterate_batches, num_batches
from gptlab.data.prepare import prepare, read_meta, resolve_data

__all__ = ["TokenDataset", "iterate_batches", "num_batches", "prepare", "read_meta", "resolve_data"]
