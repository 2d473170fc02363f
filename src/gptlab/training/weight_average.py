"""An exponential moving average (EMA) of a model's weights, kept beside the weights it trains.

After every optimizer step each averaged weight moves a share 1 - d of the way to the trained one,
d = min(decay, (1 + n) / (10 + n)) after n updates: the average forgets its random start within the
first few dozen steps, then remembers about 1 / (1 - decay) steps. Averaging the last steps'
weights cancels part of their noise, which the trained weights carry until the learning rate is
zero (the average is what a run evaluates, and what its checkpoints hold as "model").

A checkpoint of such a run stores the average as its model weights, so that generate, eval and
export read the better model with no option, and under extra["weight_average"]

    {"decay": float, "updates": int, "trained": state_dict}

the weights being trained, so that the run resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.errors import GptlabError

if TYPE_CHECKING:
    from gptlab.training.checkpoint import Checkpoint

EXTRA_KEY = "weight_average"


class WeightAverage:
    """The running average of `model`'s trainable parameters (one tensor per distinct parameter)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
        self.average = [p.detach().clone() for p in self.params]
        # Every name a state dict gives a parameter (tied weights have two), to map averages into one.
        index = {id(p): i for i, p in enumerate(self.params)}
        self.names = {
            name: index[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if id(p) in index
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights (after an optimizer step)."""
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], weight)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block (to evaluate it), its trained weights after."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, trained)

    def checkpoint_state(
        self, model_state: Mapping[str, torch.Tensor], extra: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The model weights a checkpoint stores (the average, buffers as they are), given the
        model's state dict; the trained weights go into `extra` for resuming."""
        extra[EXTRA_KEY] = {"decay": self.decay, "updates": self.updates, "trained": dict(model_state)}
        return {name: self.average[self.names[name]] if name in self.names else t for name, t in model_state.items()}

    def load(self, checkpoint_state: Mapping[str, torch.Tensor], updates: int, path: str | Path) -> None:
        """Take the average a checkpoint saved as its model weights (`updates` steps of it)."""
        missing = sorted(name for name in self.names if name not in checkpoint_state)
        if missing:
            raise GptlabError(f"{path} lacks the averaged weight {missing[0]}; it was not written by this model")
        with torch.no_grad():
            for name, i in self.names.items():
                self.average[i].copy_(checkpoint_state[name])
        self.updates = updates


def saved_average(extra: Mapping[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's weight-average entry ({"decay", "updates", "trained"}), or None if its run kept none."""
    entry = extra.get(EXTRA_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("trained"), dict) or "updates" not in entry:
        raise GptlabError(f"{path} has a damaged {EXTRA_KEY} entry; it cannot be resumed")
    return entry


def trained_state(checkpoint: Checkpoint, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights a run resumes from: the checkpoint's model weights, or the trained
    weights beside them when its run kept an average (its model weights are then the average)."""
    saved = saved_average(checkpoint.extra, path)
    return checkpoint.model_state if saved is None else saved["trained"]


def resumed_average(
    model: nn.Module, decay: float | None, checkpoint: Checkpoint | None, path: Path | None
) -> WeightAverage | None:
    """With a decay, the average of `model`'s weights: the one `checkpoint` saved (read from `path`)
    when the run resumes one that kept it, or else one starting at the weights; None without a decay."""
    if decay is None:
        return None
    average = WeightAverage(model, decay)
    saved = saved_average(checkpoint.extra, path) if checkpoint is not None else None
    if saved is not None:
        average.load(checkpoint.model_state, int(saved["updates"]), path)
    return average


def refuse_average_with(train_cfg: TrainConfig, fsdp: bool) -> None:
    """A weight average is kept for whole, unsharded models trained in full: GptlabError otherwise."""
    if train_cfg.ema_decay is None:
        return
    if train_cfg.lora_rank is not None:
        raise GptlabError("--ema_decay averages every weight, --lora_rank trains adapters only; drop one of them")
    if fsdp:
        raise GptlabError("--ema_decay keeps a whole copy of the weights, which FSDP shards; drop --fsdp (DDP works)")
