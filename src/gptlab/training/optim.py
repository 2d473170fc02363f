"""The optimizers (AdamW, or Muon for hidden matrices beside AdamW), the learning-rate schedule (and
Muon's momentum warmup) and its plan under a time budget."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.device import fast_bf16
from gptlab.errors import GptlabError
from gptlab.training.muon import Muon

MUON_MOMENTUM = 0.95  # torch.optim.Muon's default
MUON_START_MOMENTUM = 0.85  # where muon_momentum_warmup starts it


class OptimizerSet:
    """Optimizers that step together as one, each over its own parameters (e.g. Muon for the
    blocks' matrices and AdamW for everything else). Offers the parts of the torch.optim API
    the trainer uses; its state_dict holds every optimizer's, by name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what state_dict() returned; also a bare AdamW state dict (checkpoints from before
        optimizer sets) when this set is AdamW alone."""
        if "optimizers" not in state and list(self.optimizers) == ["adamw"]:
            state = {"optimizers": {"adamw": state}}
        saved = state.get("optimizers", {})
        if set(saved) != set(self.optimizers):
            raise GptlabError(
                f"the checkpoint was trained with optimizer(s) {', '.join(sorted(saved)) or 'unknown'}, this run uses "
                f"{', '.join(sorted(self.optimizers))}; resume with the --optimizer it was trained with"
            )
        for name, optimizer in self.optimizers.items():
            _load_keeping_settings(optimizer, saved[name])


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, bf16_fast: bool | None = None
) -> OptimizerSet:
    """The optimizer cfg.optimizer names, over `model`'s parameters.

    adamw: AdamW with weight decay on matrices only (the model's configure_optimizer_groups).
    muon: Muon (torch.optim.Muon's orthogonalised momentum, 2-D weights only; training/muon.py)
    for the hidden matrices (attention and MLP weights), at cfg.muon_lr; AdamW at
    cfg.learning_rate for embeddings, the output head, norms and biases. The fused AdamW kernel is
    used where torch has one for `device`. `bf16_fast`: whether bf16 is fast on this CPU, as a
    resumed run decided it (None: measure).
    """
    speed = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        # Frozen parameters (a LoRA run's base) get no optimizer state: only what trains is held.
        groups = [
            {**group, "params": [p for p in group["params"] if p.requires_grad]}
            for group in model.configure_optimizer_groups(cfg.weight_decay)
        ]
        return OptimizerSet({"adamw": torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, **speed)})

    hidden = hidden_matrices(model)
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    adamw_groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    # set_lr scales every group by the schedule; Muon's groups keep their own peak through lr_ratio.
    # Orthogonalised in bfloat16 as torch does, except on a CPU that computes it slower than float32.
    muon = Muon(
        [{"params": hidden, "lr_ratio": cfg.muon_lr / cfg.learning_rate}],
        lr=cfg.muon_lr,
        momentum=muon_momentum_at(0, cfg),
        weight_decay=cfg.weight_decay,
        ns_dtype=torch.bfloat16 if fast_bf16(device, bf16_fast) else torch.float32,
    )
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.learning_rate, betas=betas, **speed)
    return OptimizerSet({"muon": muon, "adamw": adamw})


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Weights of the linear layers inside the network: every nn.Linear's weight except the output
    head's and any shared with an embedding table (tied weights)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head") and id(module.weight) not in tables:
            found.setdefault(id(module.weight), module.weight)
    return list(found.values())


def total_steps(epochs: int, batches_per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps the run will take: every batch of every epoch, capped by max_steps."""
    steps = epochs * batches_per_epoch
    return min(steps, max_steps) if max_steps is not None else steps


def estimate_total_steps(
    step: int, train_seconds: float, budget_s: float, seconds_per_step: float | None, cap: int
) -> int:
    """Optimizer steps a time-budgeted run will have taken when its budget runs out, estimated
    before its 0-based `step` from the training seconds spent so far and the measured
    seconds_per_step (None before there is a measurement: then `cap`, the step-count plan).
    At least step + 1 (the step about to be taken), at most `cap`.
    """
    if seconds_per_step is None or seconds_per_step <= 0:
        return cap
    # The tolerance keeps float noise (9.000000001 steps) from planning one step too many.
    remaining = math.ceil((budget_s - train_seconds) / seconds_per_step - 1e-9)
    return min(cap, max(step + 1, step + remaining))


class BudgetPlan:
    """How many steps a time budget holds, re-estimated after every step from the training time.

    The first `untimed_steps` steps of the run are not timed (they pay for compilation and
    warm-up); until a step after them is done, the plan is `cap`, the step-count plan.
    """

    def __init__(self, budget_s: float, cap: int, first_step: int, untimed_steps: int = 3):
        self.budget_s, self.cap, self.first_step, self.untimed_steps = budget_s, cap, first_step, untimed_steps
        self.step = first_step  # optimizer steps taken, as of the last record()
        self.train_seconds = 0.0
        self._mark: tuple[int, float] | None = None  # (step, train_seconds) when the untimed steps were done

    def record(self, step: int, train_seconds: float) -> bool:
        """Note that `step` steps are done after `train_seconds` of training; True once the budget
        is spent. Raises GptlabError when the first step alone spent it (only a step can tell)."""
        self.step, self.train_seconds = step, train_seconds
        steps_taken = step - self.first_step
        if steps_taken == self.untimed_steps:
            self._mark = (step, train_seconds)
        if steps_taken == 1 and train_seconds >= self.budget_s:
            raise GptlabError(
                f"time_budget {self.budget_s:g}s is too short to take one training step (a step took "
                f"{train_seconds:.3g}s); raise it"
            )
        return train_seconds >= self.budget_s

    def seconds_per_step(self) -> float | None:
        """Mean training seconds of the steps after the untimed ones (None before one is done)."""
        if self._mark is None or self.step <= self._mark[0]:
            return None
        mark_step, mark_seconds = self._mark
        return (self.train_seconds - mark_seconds) / (self.step - mark_step)

    def total_steps(self) -> int:
        """Steps the run will have taken when the budget runs out (see estimate_total_steps)."""
        return estimate_total_steps(self.step, self.train_seconds, self.budget_s, self.seconds_per_step(), self.cap)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for the 0-based optimizer `step` of a run of `total` steps.

    Linear warmup to cfg.learning_rate over cfg.warmup_steps (step 0 already moves the weights),
    then down to cfg.min_lr_ratio * cfg.learning_rate, reached at step `total`: along a half cosine,
    or with lr_schedule "wsd" held at the peak until the last cfg.decay_fraction of the steps and
    then along a straight line. Under a time budget `total` is an estimate until the end nears,
    which the stable phase of wsd does not depend on.
    A pure function of its arguments, so a schedule can be planned (or replayed) anywhere.
    """
    peak = cfg.learning_rate
    floor = cfg.min_lr_ratio * peak
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if step >= total:
        return floor
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_steps, total - round(cfg.decay_fraction * total))
        if step < decay_start:
            return peak
        return peak + (floor - peak) * (step - decay_start) / (total - decay_start)
    progress = (step - cfg.warmup_steps) / (total - cfg.warmup_steps)  # 0 -> 1
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def muon_momentum_at(step: int, cfg: TrainConfig) -> float:
    """Muon's momentum for the 0-based `step`: from 0.85 up to 0.95 along a straight line over the
    first cfg.muon_momentum_warmup steps, then 0.95. Early on, when the weights and so the gradients
    change fastest, a shorter memory follows them more closely."""
    if step >= cfg.muon_momentum_warmup:
        return MUON_MOMENTUM
    return MUON_START_MOMENTUM + (MUON_MOMENTUM - MUON_START_MOMENTUM) * step / cfg.muon_momentum_warmup


def apply_schedule(optimizer: torch.optim.Optimizer | OptimizerSet, step: int, total: int, cfg: TrainConfig) -> float:
    """Set the learning rate of `step` of a run of `total` steps (lr_at), and Muon's momentum
    (muon_momentum_at) if the optimizer has Muon; return the learning rate."""
    lr = lr_at(step, total, cfg)
    set_lr(optimizer, lr)
    if isinstance(optimizer, OptimizerSet) and "muon" in optimizer.optimizers:
        for group in optimizer.optimizers["muon"].param_groups:
            group["momentum"] = muon_momentum_at(step, cfg)
    return lr


def set_lr(optimizer: torch.optim.Optimizer | OptimizerSet, lr: float) -> None:
    """Set the learning rate of every parameter group: `lr`, times the group's lr_ratio if it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


def load_optimizer_state(optimizer: torch.optim.Optimizer | OptimizerSet, state: dict[str, Any]) -> None:
    """Load a saved optimizer's moments but keep this optimizer's settings (kernels, betas, decay)."""
    if isinstance(optimizer, OptimizerSet):
        optimizer.load_state_dict(state)
    else:
        _load_keeping_settings(optimizer, state)


def _load_keeping_settings(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    # load_state_dict would replace this run's settings with the saved ones.
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as err:
        raise GptlabError(
            f"the checkpoint's optimizer state does not fit this model ({str(err).splitlines()[0]}); "
            "resume with the settings it was trained with"
        ) from None
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
    # torch loads moments of any shape; one that is not its parameter's would fail at the first step.
    for param, moments in optimizer.state.items():
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise GptlabError(
                    f"the checkpoint's optimizer state has {name} of shape {tuple(value.shape)} for a parameter "
                    f"of shape {tuple(param.shape)}; resume from another checkpoint"
                )
