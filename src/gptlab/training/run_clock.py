"""The trainer's clock: the training seconds a time budget counts and the schedule they plan.

A mixin of training/trainer.py's Trainer (it reads the Trainer's budget, log, world and device).
"""

from __future__ import annotations

import time

import torch

from gptlab.training import distributed


class RunClock:
    # ---- the time budget ------------------------------------------------------------------------
    def _schedule_total(self) -> int:
        """The `total` lr_at decays against: the step plan, or under a time budget one less than
        the steps the budget is estimated to hold, so that the last of them runs at the floor."""
        if self.budget is None:
            return self.total_steps
        self.planned_steps = self.budget.total_steps()
        self.log.bar.total = self.planned_steps
        return self.planned_steps - 1

    def _training_seconds(self) -> float:
        """Seconds since the loop started, evaluation and saving excluded; under torchrun the ranks'
        mean, so that every rank plans the same schedule and stops at the same step."""
        seconds = time.perf_counter() - self.started - self.excluded_seconds
        if self.world.distributed:
            summed = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            seconds = distributed.all_reduce_sum(summed, self.world).item() / self.world.world_size
        return seconds
