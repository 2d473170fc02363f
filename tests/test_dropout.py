"""models/dropout.py: the CPU dropout that draws 16 random bits per element."""

import pytest
import torch

from gptlab.models.dropout import Dropout, keep_mask


def test_every_element_is_kept_with_probability_one_minus_p():
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([4, 1 << 18]), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (4, 1 << 18)
    assert mask.float().mean().item() == pytest.approx(0.9, abs=0.002)
    # each of the four 16-bit numbers read from one 64-bit word is uniform, the top one included
    lanes = mask.view(-1, 4).float().mean(dim=0)
    assert torch.allclose(lanes, torch.full((4,), 0.9), atol=0.003), lanes


def test_an_odd_number_of_elements_gets_a_mask_of_its_shape():
    assert keep_mask(torch.Size([3, 5, 7]), 0.5).shape == (3, 5, 7)


def test_survivors_are_scaled_so_that_the_mean_is_kept_and_the_gradient_uses_the_same_mask():
    torch.manual_seed(1)
    layer = Dropout(0.25).train()
    x = torch.randn(64, 1024, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75)
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.01)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float() / 0.75)
    ones = torch.ones(1 << 20)
    assert layer(ones).mean().item() == pytest.approx(1.0, abs=0.005)


def test_the_same_seed_draws_the_same_mask_and_keeps_the_input_dtype():
    x = torch.randn(8, 33, dtype=torch.bfloat16)
    torch.manual_seed(7)
    first = Dropout(0.1).train()(x)
    torch.manual_seed(7)
    again = Dropout(0.1).train()(x)
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)


def test_evaluation_and_p_zero_leave_the_input_alone():
    x = torch.randn(4, 16)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_p_near_one_drops_everything():
    x = torch.randn(4, 16)
    assert torch.equal(Dropout(0.999999).train()(x), torch.zeros_like(x))
