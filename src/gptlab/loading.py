"""gptlab.load: any trained model, from a `.pth` checkpoint or a directory written by
`gptlab export --format safetensors`, read once, with its tokenizer and what else it records.
A LoRA adapter checkpoint comes back as the whole model: its base, with the adapters merged in.

    loaded = gptlab.load("runs/demo/demo_e10.pth", "cpu")
    loaded.model, loaded.tokenizer, loaded.model_type   # "gpt" or "transformer"

Which model class a checkpoint builds is decided by its model_type in one place,
training/checkpoint.py's MODEL_CLASSES.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from gptlab.config import DatasetConfig, TrainConfig
from gptlab.interop.base_models import whole_state
from gptlab.interop.safetensors_io import is_safetensors_dir, load_safetensors_dir
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint import Checkpoint, build_model, check_model_type, load_checkpoint


@dataclass
class LoadedModel:
    """A model (on its device, in eval mode) and what came with it. The configs and the checkpoint
    are None for an exported directory, which keeps only the model's config and its tokenizer."""

    model: nn.Module
    tokenizer: Tokenizer
    data_config: DatasetConfig | None = None
    train_config: TrainConfig | None = None
    checkpoint: Checkpoint | None = None

    @property
    def model_type(self) -> str:
        return self.model.config.model


def load(path: str | Path, device: str | torch.device = "cpu", model_type: str | None = None) -> LoadedModel:
    """The model at `path` (a gptlab checkpoint or safetensors directory) on `device`, reading
    the file once. With model_type ("gpt", "transformer"), a model of another type is a
    GptlabError saying what to pass instead; any problem with the file is one too."""
    if is_safetensors_dir(path):  # holds GPTs only
        model, tokenizer, _ = load_safetensors_dir(path, device)
        return LoadedModel(model, tokenizer)
    checkpoint = load_checkpoint(path, map_location="cpu")
    if model_type is not None:
        check_model_type(checkpoint, path, model_type)
    checkpoint = replace(checkpoint, model_state=whole_state(checkpoint, path))  # LoRA adapters: merged into their base
    model = build_model(checkpoint, path, device)
    return LoadedModel(model, checkpoint.tokenizer, checkpoint.data_config, checkpoint.train_config, checkpoint)
