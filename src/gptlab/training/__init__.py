"""Training GPTs and encoder-decoder Transformers: the loop, the optimizer and schedule, checkpoints and metrics."""

from gptlab.training.checkpoint import Checkpoint, load_checkpoint, load_model, load_transformer, save_checkpoint
from gptlab.training.metrics import EvalResult, evaluate
from gptlab.training.trainer import Trainer, TrainResult, train

__all__ = [
    "Checkpoint",
    "EvalResult",
    "TrainResult",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "load_transformer",
    "save_checkpoint",
    "train",
]
