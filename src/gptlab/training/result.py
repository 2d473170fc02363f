"""What a training run returns: how it ended, its last losses and scores, and its final checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptlab.training.metrics import EvalResult
from gptlab.training.multiple_choice import ChoiceResult

StopReason = Literal["completed", "max_steps", "time_budget", "interrupted"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind.

    train_loss is the mean training loss over the last logging interval (the steps since the
    log line before it, at most eval_interval); eval and task are the last evaluation's;
    elapsed_s is wall-clock time of the loop, evaluation included.
    """

    final_checkpoint: Path
    steps: int
    epochs_completed: int
    train_loss: float
    eval: EvalResult | None
    tokens_seen: int
    elapsed_s: float
    stopped_reason: StopReason
    task: ChoiceResult | None = None  # the last --eval_task scores
