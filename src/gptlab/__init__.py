"""gptlab: train GPT language models from scratch, with a byte-level BPE tokenizer of its own.

from gptlab import load_tokenizer, train, load, generate
"""

from gptlab.config import DatasetConfig, ModelConfig, SampleConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate, stream_text, translate
from gptlab.loading import LoadedModel, load
from gptlab.models import GPT
from gptlab.models.transformer import Transformer
from gptlab.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from gptlab.training import evaluate, load_model, load_transformer, train

__all__ = [
    "GPT",
    "DatasetConfig",
    "GptlabError",
    "LoadedModel",
    "ModelConfig",
    "SampleConfig",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "evaluate",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "load_transformer",
    "stream_text",
    "train",
    "train_tokenizer",
    "translate",
]
