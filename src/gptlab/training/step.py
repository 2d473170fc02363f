"""One optimizer step: forward/backward over this rank's micro-batches, then clip and update.

The loss of a step is the mean over every counted target token of the whole step batch (all
micro-batches, all ranks), exactly as one big batch would give: each micro-batch's mean loss is
weighted by its share of the step's target tokens. (Padding and ignore_index targets do not
count, so a short last micro-batch weighs what its tokens weigh.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.device import sum_dtype
from gptlab.training.batching import MicroBatch
from gptlab.training.distributed import World, all_reduce_sum, gradient_sync
from gptlab.training.optim import OptimizerSet
from gptlab.training.precision import Precision
from gptlab.training.tasks import Task


class NonFiniteLoss(Exception):
    """The loss or the gradient norm became nan/inf (raised before the weights change)."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss over the step batch's target tokens, all ranks
    grad_norm: float  # global gradient norm before clipping
    tokens: int  # tokens processed by all ranks (what tokens/s counts)


def optimizer_step(
    model: nn.Module,
    task: Task,
    micro_batches: list[MicroBatch],
    optimizer: OptimizerSet,
    precision: Precision,
    world: World,
    device: torch.device,
    grad_clip: float,
) -> StepResult:
    """Accumulate the gradients of `micro_batches` and take one optimizer step (the learning
    rate already set). Raises NonFiniteLoss, leaving the weights untouched, on a nan/inf loss."""
    local_targets = sum(mb.targets for mb in micro_batches)
    # Every rank needs the step's total target count before its first backward.
    counted = torch.tensor([float(local_targets)], dtype=sum_dtype(device), device=device)
    total_targets = all_reduce_sum(counted, world).item()
    # DDP / FSDP average gradients over ranks; scaling by world_size turns that average into our sum.
    ranks = world.world_size
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=sum_dtype(device), device=device)
    tokens = 0
    for i, micro in enumerate(micro_batches):
        batch = task.to_device(micro.batch, device)
        weight = micro.targets / total_targets if total_targets else 0.0
        with gradient_sync(model, world, sync=i == len(micro_batches) - 1):
            with precision.autocast():
                loss = task.loss(model, batch)  # mean over this micro-batch's targets
            precision.backward(loss * (weight * ranks))
        step_loss += loss.detach().to(step_loss.dtype) * weight
        tokens += task.num_tokens(micro.batch) if micro.targets else 0

    precision.unscale(optimizer)
    # Clipping to infinity only measures the norm: it is logged either way.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    totals = all_reduce_sum(torch.stack([step_loss, step_loss.new_tensor(float(tokens))]), world)
    norm = grad_norm.detach().to(device, step_loss.dtype).reshape(1)
    loss_value, token_count, norm_value = torch.cat([totals, norm]).tolist()  # one sync
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(f"the training loss became {loss_value}")
    if not math.isfinite(norm_value) and not precision.skips_bad_steps:
        raise NonFiniteLoss(f"the gradient norm became {norm_value}")
    precision.step(optimizer)
    return StepResult(loss=loss_value, grad_norm=norm_value, tokens=int(token_count))
