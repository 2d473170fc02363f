"""The optimizer (AdamW, weight decay on matrices only) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gptlab.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (decay on weight matrices, none on biases,
    norms or other vectors), with the betas of `cfg`.

    Uses the fused CUDA kernel on GPUs and the multi-tensor (foreach) path elsewhere.
    """
    groups = model.configure_optimizer_groups(cfg.weight_decay)
    speed = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **speed)


def total_steps(epochs: int, batches_per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps the run will take: every batch of every epoch, capped by max_steps."""
    steps = epochs * batches_per_epoch
    return min(steps, max_steps) if max_steps is not None else steps


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for the 0-based optimizer `step` of a run of `total` steps.

    Linear warmup to cfg.learning_rate over cfg.warmup_steps (step 0 already moves the weights),
    then a half cosine down to cfg.min_lr_ratio * cfg.learning_rate, reached at step `total`.
    A pure function of its arguments, so a schedule can be planned (or replayed) anywhere.
    """
    peak = cfg.learning_rate
    floor = cfg.min_lr_ratio * peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    decay_steps = total - cfg.warmup_steps
    if decay_steps <= 0 or step >= total:
        return floor
    progress = (step - cfg.warmup_steps) / decay_steps  # 0 -> 1
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a saved optimizer's moments but keep this optimizer's settings (kernels, betas, decay),
    which load_state_dict would otherwise replace with the saved ones."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
