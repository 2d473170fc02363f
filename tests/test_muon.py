"""gptlab's Muon: torch.optim.Muon's step, with the Newton–Schulz iteration in a chosen dtype."""

from __future__ import annotations

import pytest
import torch

from gptlab import device
from gptlab.config import TrainConfig
from gptlab.training import optim
from gptlab.training.muon import Muon, orthogonalise

from helpers import random_gpt


def steps(optimizer_class, shapes, **settings) -> list[torch.Tensor]:
    """The parameters after three steps on fixed gradients, from fixed starting weights."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]
    optimizer = optimizer_class(params, lr=0.02, weight_decay=0.1, **settings)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad
        optimizer.step()
    return [param.detach() for param in params]


SHAPES = [(48, 16), (16, 48), (24, 24)]  # tall, wide and square: each orientation of the iteration


def test_in_bfloat16_it_computes_exactly_what_torch_muon_does():
    for ours, theirs in zip(steps(Muon, SHAPES), steps(torch.optim.Muon, SHAPES)):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(steps(Muon, SHAPES, nesterov=False), steps(torch.optim.Muon, SHAPES, nesterov=False)):
        assert torch.equal(ours, theirs)


def test_in_float32_it_is_torch_muon_without_the_bfloat16_rounding():
    float32 = steps(Muon, SHAPES, ns_dtype=torch.float32)
    for ours, theirs in zip(float32, steps(torch.optim.Muon, SHAPES)):
        assert not torch.equal(ours, theirs)
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=0)  # bf16 keeps 8 bits of mantissa


REPEATED_SHAPES = [(48, 16), (16, 48), (48, 16), (24, 24), (16, 48), (24, 24), (48, 16)]  # a model's layers


def test_same_shaped_matrices_stepped_together_give_torch_muons_step():
    # Batched products may round as the single ones do (bitwise on the machines measured) or not.
    for ours, theirs in zip(steps(Muon, REPEATED_SHAPES), steps(torch.optim.Muon, REPEATED_SHAPES)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_stack_is_orthogonalised_as_each_matrix_alone(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    matrices = [scale * torch.randn(shape, generator=generator) for scale in (0.01, 1.0, 100.0)]  # norms apart
    settings = ((3.4445, -4.775, 2.0315), 5, 1e-7, dtype)
    alone = torch.stack([orthogonalise(matrix, *settings) for matrix in matrices])
    together = orthogonalise(torch.stack(matrices), *settings)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert together.shape == (3, *shape)


def test_unsupported_settings_are_refused():
    with pytest.raises(ValueError, match="adjust_lr_fn 'match_rms_adamw' is not supported"):
        steps(Muon, SHAPES, adjust_lr_fn="match_rms_adamw")


@pytest.mark.parametrize("speedup, ns_dtype", [(0.02, torch.float32), (1.6, torch.bfloat16)])
def test_a_cpu_orthogonalises_in_bfloat16_only_where_it_is_measured_faster(monkeypatch, speedup, ns_dtype):
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    model = random_gpt(vocab_size=64)
    optimizers = optim.build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers
    assert isinstance(optimizers["muon"], Muon) and optimizers["muon"].ns_dtype == ns_dtype


def test_momentum_warmup_rises_from_085_to_095_and_each_step_uses_the_groups_momentum():
    cfg = TrainConfig(optimizer="muon", muon_momentum_warmup=100, learning_rate=1e-3, warmup_steps=0)
    momenta = [optim.muon_momentum_at(step, cfg) for step in (0, 50, 99, 100, 5000)]
    assert momenta == pytest.approx([0.85, 0.90, 0.949, 0.95, 0.95])
    assert optim.muon_momentum_at(0, TrainConfig(optimizer="muon")) == 0.95  # no warmup: torch's momentum

    optimizer = optim.build_optimizer(random_gpt(vocab_size=64), cfg, torch.device("cpu"))
    assert [g["momentum"] for g in optimizer.optimizers["muon"].param_groups] == [0.85]
    lr = optim.apply_schedule(optimizer, 50, 1000, cfg)
    assert lr == optim.lr_at(50, 1000, cfg)
    assert [g["momentum"] for g in optimizer.optimizers["muon"].param_groups] == [pytest.approx(0.90)]
    assert all(g["betas"] == (cfg.beta1, cfg.beta2) for g in optimizer.optimizers["adamw"].param_groups)
    # The step reads the group's momentum: at 0.85 it is torch's Muon at 0.85, not at its 0.95.
    for ours, theirs in zip(steps(Muon, SHAPES, momentum=0.85), steps(torch.optim.Muon, SHAPES, momentum=0.85)):
        assert torch.equal(ours, theirs)
    assert not torch.equal(steps(Muon, SHAPES, momentum=0.85)[0], steps(Muon, SHAPES)[0])
