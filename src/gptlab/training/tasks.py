"""What the training loop needs to know about a model type, as one small strategy object each:
which data it reads, which model it builds, how a batch becomes a loss, and how it is evaluated.

The loop itself (trainer.py) stays the same for every model type; `task_for` picks the task
named by ModelConfig.model, or by TrainConfig.task for a GPT fine-tuned on conversations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.data import TokenDataset, resolve_data, window_offset
from gptlab.data.conversations import ChatDataset
from gptlab.data.pairs import PairBatch, PairDataset
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.models.fused_loss import IGNORE_INDEX
from gptlab.models.transformer import Transformer
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.metrics import EvalResult, evaluate, evaluate_pairs


class Task(ABC):
    """One model type's data, model, loss and evaluation. Datasets offer len() and
    batch(indices) (see data.iterate_batches), num_tokens and bytes_per_token."""

    reads_a_token_stream = False  # whether its windows can be shifted (DatasetConfig.shift_windows)

    def __init__(self, model_cfg: ModelConfig, data_cfg: DatasetConfig, train_cfg: TrainConfig, tokenizer: Tokenizer):
        if data_cfg.shift_windows and not self.reads_a_token_stream:
            raise GptlabError(
                "--shift_windows cuts a text into windows anew each epoch; it is for a GPT trained on text"
            )
        self.model_cfg, self.data_cfg, self.train_cfg, self.tokenizer = model_cfg, data_cfg, train_cfg, tokenizer

    def epoch_data(self, dataset: Any, epoch: int) -> Any:
        """The training data as epoch `epoch` reads it (the same in every epoch, unless shifted)."""
        return dataset

    @abstractmethod
    def load_dataset(self, path: str | Path, progress: bool) -> Any:
        """The training or evaluation data at `path`."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model of model_cfg."""

    @abstractmethod
    def to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch on `device`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of one batch (a scalar, label smoothing applied)."""

    @abstractmethod
    def num_tokens(self, batch: Any) -> int:
        """Tokens the model processed for this batch (what tokens/s counts)."""

    @abstractmethod
    def num_targets(self, batch: Any) -> int:
        """Targets that count in the loss (not ignore_index): what a micro-batch's loss is weighted by."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, dataset: Any, max_batches: int, device: torch.device, dtype: torch.dtype | None = None
    ) -> EvalResult:
        """Evaluation on up to `max_batches` batches of `dataset`, under autocast to `dtype`."""


class LanguageModelTask(Task):
    """GPT: windows of a token stream, next-token loss at every position."""

    reads_a_token_stream = True

    def load_dataset(self, path: str | Path, progress: bool) -> TokenDataset:
        return TokenDataset(resolve_data(path, self.tokenizer, progress=progress), self.model_cfg.seq_len)

    def epoch_data(self, dataset: TokenDataset, epoch: int) -> TokenDataset:
        if not self.data_cfg.shift_windows:
            return dataset
        return dataset.shifted(window_offset(self.train_cfg.seed, epoch, dataset.seq_len))

    def build_model(self) -> GPT:
        return GPT(self.model_cfg)

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Any:
        return tuple(t.to(device, non_blocking=True) for t in batch)  # x, y: (B, T) each

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if not self.train_cfg.label_smoothing:
            return model(x, y, return_logits=False)[1]
        logits, _ = model(x)  # (B, T, V)
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            y.flatten(),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.train_cfg.label_smoothing,
        )

    def num_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def num_targets(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())

    def evaluate(
        self, model: nn.Module, dataset: TokenDataset, max_batches: int, device: torch.device, dtype=None
    ) -> EvalResult:
        return evaluate(model, dataset, self.data_cfg.batch_size, max_batches, device, dtype)


class ChatTask(LanguageModelTask):
    """GPT on conversations (supervised fine-tuning): one padded row per conversation, the loss
    on assistant tokens only (data/conversations.py); the same model, loss and evaluation."""

    reads_a_token_stream = False

    def load_dataset(self, path: str | Path, progress: bool) -> ChatDataset:
        return ChatDataset.from_file(path, self.tokenizer, self.model_cfg.seq_len, self.data_cfg.skip_bad_lines)


class Seq2SeqTask(Task):
    """Encoder-decoder Transformer: source/target pairs, loss on target tokens only."""

    def load_dataset(self, path: str | Path, progress: bool) -> PairDataset:
        cfg = self.model_cfg
        return PairDataset.from_file(path, self.tokenizer, cfg.source_len, cfg.seq_len, self.data_cfg.skip_bad_lines)

    def build_model(self) -> Transformer:
        return Transformer(self.model_cfg)

    def to_device(self, batch: PairBatch, device: torch.device) -> PairBatch:
        return batch.to(device)

    def loss(self, model: nn.Module, batch: PairBatch) -> torch.Tensor:
        return model(batch.src, batch.tgt, batch.src_mask, batch.labels, self.train_cfg.label_smoothing)[1]

    def num_tokens(self, batch: PairBatch) -> int:
        return batch.num_tokens

    def num_targets(self, batch: PairBatch) -> int:
        return int((batch.labels != IGNORE_INDEX).sum())

    def evaluate(
        self, model: nn.Module, dataset: PairDataset, max_batches: int, device: torch.device, dtype=None
    ) -> EvalResult:
        return evaluate_pairs(model, dataset, self.tokenizer, self.data_cfg.batch_size, max_batches, device, dtype)


TASKS: dict[str, type[Task]] = {"gpt": LanguageModelTask, "transformer": Seq2SeqTask}


def task_for(model_cfg: ModelConfig, data_cfg: DatasetConfig, train_cfg: TrainConfig, tokenizer: Tokenizer) -> Task:
    """The task of the model type model_cfg.model (a GPT's task is train_cfg.task)."""
    if model_cfg.model == "gpt" and train_cfg.task == "chat":
        return ChatTask(model_cfg, data_cfg, train_cfg, tokenizer)
    return TASKS[model_cfg.model](model_cfg, data_cfg, train_cfg, tokenizer)
