"""gptlab: train GPT language models from scratch, with a byte-level BPE tokenizer of its own.

    from gptlab import load_tokenizer, train, load_model, generate
"""

from gptlab.config import DatasetConfig, ModelConfig, SampleConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate, stream_text
from gptlab.models import GPT
from gptlab.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from gptlab.training import evaluate, load_model, train

__all__ = [
    "GPT",
    "DatasetConfig",
    "GptlabError",
    "ModelConfig",
    "SampleConfig",
    "Tokenizer",
    "TrainConfig",
    "evaluate",
    "generate",
    "load_model",
    "load_tokenizer",
    "stream_text",
    "train",
    "train_tokenizer",
]
