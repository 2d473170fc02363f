"""Mixed precision for training: the autocast context, and loss scaling when it is float16."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from gptlab.device import autocast, cpu_bf16_speedup, resolve_dtype
from gptlab.training.optim import OptimizerSet

EMULATED_BF16 = 0.5  # bf16 matmuls under half float32's speed: no AVX-512 BF16 or AMX (45-70x slower)


def kept_bf16_decision(device: torch.device, resumed: bool | None) -> bool | None:
    """Whether bf16 counts as fast on this CPU, for --dtype auto and Muon's iteration: as the run
    being resumed decided it, so that a run whose CPU measures near the line (bf16 1.0-1.2x float32's
    speed) resumes in the precision it trained in, bitwise; but measured again where this CPU emulates
    bf16, where keeping a faster CPU's decision would crawl. None off a CPU (fast where supported)."""
    if device.type != "cpu":
        return None
    speedup = cpu_bf16_speedup()
    if resumed is None or speedup < EMULATED_BF16:
        return speedup > 1
    return resumed


class Precision:
    """Autocast to the dtype TrainConfig.dtype names; with float16 (CUDA only) a GradScaler keeps
    small gradients from underflowing. bfloat16 and float32 need no scaling.

    The scaler's state travels in checkpoints, so a resumed fp16 run scales exactly as before.
    """

    def __init__(self, dtype_name: str, device: torch.device, resumed_bf16_fast: bool | None = None):
        """`resumed_bf16_fast`: the bf16 decision that the run being resumed recorded (None: none)."""
        self.device = device
        self.bf16_fast = kept_bf16_decision(device, resumed_bf16_fast)  # what checkpoints record
        self.dtype = resolve_dtype(dtype_name, device, self.bf16_fast)
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(device.type) if fp16 else None
        kept = resumed_bf16_fast is not None and resumed_bf16_fast == self.bf16_fast
        self.notice = self._cpu_notice(dtype_name, kept) if device.type == "cpu" else None  # a line for the log

    def _cpu_notice(self, dtype_name: str, kept: bool) -> str | None:
        """What a CPU's measured bf16 speed decided, or a warning when bf16 was asked for and is slow."""
        if dtype_name == "auto" and kept:
            return f"--dtype auto: {self.name}, as the run being resumed trained (its checkpoint says)"
        speedup = cpu_bf16_speedup() if dtype_name in ("auto", "bf16") else None
        if dtype_name == "auto":
            return f"--dtype auto: {self.name} (this CPU's bf16 matmuls measured {speedup:.2g}x float32's speed)"
        if self.dtype == torch.bfloat16 and speedup < 1:
            return (
                f"--dtype bf16: this CPU's bf16 matmuls measured {speedup:.2g}x float32's speed "
                "(no AVX-512 BF16 or AMX); --dtype auto or fp32 trains faster here"
            )
        return None

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: OptimizerSet) -> None:
        """Bring the gradients back to their true size (before clipping or measuring them)."""
        if self.scaler is not None:
            for inner in optimizer.optimizers.values():
                self.scaler.unscale_(inner)

    def step(self, optimizer: OptimizerSet) -> None:
        """optimizer.step(); with a scaler, a step with inf/nan gradients is skipped and the scale lowered."""
        if self.scaler is None:
            optimizer.step()
            return
        for inner in optimizer.optimizers.values():
            self.scaler.step(inner)
        self.scaler.update()

    @property
    def skips_bad_steps(self) -> bool:
        """Whether non-finite gradients are expected now and then (the scaler skips those steps)."""
        return self.scaler is not None

    def state_dict(self) -> dict[str, Any] | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
