"""Muon whose Newton–Schulz iteration runs in a dtype the machine computes fast.

torch.optim.Muon orthogonalises every update in bfloat16: fast on GPUs and on CPUs with AVX-512
BF16 or AMX, but on a CPU without them each bfloat16 matmul is emulated. For cpu-10min's 24 hidden
matrices on a 2-core AVX2 EPYC, one step's iterations took 12.5 s in bfloat16 and 0.37 s in
float32. This Muon is torch's (same hyperparameters, state and checkpoints) with the iteration in
`ns_dtype`; in bfloat16 it computes exactly what torch's does (tests/test_muon.py).
"""

from __future__ import annotations

import math

import torch


def orthogonalise(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """About U Vᵀ for update = U S Vᵀ: the quintic Newton–Schulz iteration of torch.optim.Muon
    (Keller Jordan's coefficients push singular values towards 1 in few steps), in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix x xᵀ is the smaller one
        x = x.T
    x = x.div(x.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with the Newton–Schulz iteration in `ns_dtype` (module docstring)."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("this Muon takes no closure")
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"adjust_lr_fn {group['adjust_lr_fn']!r} is not supported here")
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad, state = param.grad, self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                rows, columns = param.shape
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * math.sqrt(max(1, rows / columns)))  # torch's "original" scale
        return None
