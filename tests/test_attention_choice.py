"""models/attention_choice.py: the explicit causal attention and the measured choice between it and SDPA."""

import pytest
import torch
import torch.nn.functional as F

from gptlab.models import attention_choice
from gptlab.models.attention_choice import causal_attention, choose_attention, explicit_causal_attention


def qkv(shape=(2, 3, 16, 8), dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for _ in range(3)]


def test_explicit_attention_equals_sdpa_in_values_and_gradients():
    q, k, v = qkv()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    grad = torch.randn(2, 3, 16, 8)
    explicit = explicit_causal_attention(q, k, v)
    fused = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    assert torch.allclose(explicit, fused, atol=1e-5)
    explicit.backward(grad)
    fused.backward(grad)
    for a, b in zip((q, k, v), (q2, k2, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_explicit_attention_is_causal():
    q, k, v = qkv()
    before = explicit_causal_attention(q, k, v)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 10:], v2[:, :, 10:] = 100.0, -100.0  # change only the future of positions < 10
    after = explicit_causal_attention(q, k2, v2)
    assert torch.equal(before[:, :, :10], after[:, :, :10])
    assert not torch.allclose(before[:, :, 10:], after[:, :, 10:])


@pytest.fixture
def fresh_choices():
    attention_choice.forget_attention_choices()
    yield
    attention_choice.forget_attention_choices()


def test_a_bf16_training_step_gets_either_form_within_bf16_rounding_and_the_runs_random_numbers_stay(fresh_choices):
    q, k, v = qkv(dtype=torch.bfloat16)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    out = causal_attention(q, k, v)  # measures this shape first
    assert torch.equal(torch.get_rng_state(), state)  # timing drew from its own generator
    assert len(attention_choice._CHOSEN) == 1
    reference = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), is_causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=3e-2)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


@pytest.mark.parametrize("explicit_wins", [True, False])
def test_the_cached_choice_decides_the_form(fresh_choices, monkeypatch, explicit_wins):
    q, k, v = qkv(dtype=torch.bfloat16)
    seconds = {"explicit_causal_attention": 1.0 if explicit_wins else 5.0, "scaled_dot_product_attention": 2.0}
    monkeypatch.setattr(attention_choice, "_seconds", lambda attention, like, **kw: seconds[attention.__name__])
    assert choose_attention(tuple(q.shape), torch.bfloat16) is explicit_wins
    expected = (
        explicit_causal_attention(q, k, v) if explicit_wins else F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    assert torch.equal(causal_attention(q, k, v), expected)


def test_a_close_call_keeps_the_fused_kernel(fresh_choices, monkeypatch):
    seconds = {"explicit_causal_attention": 1.0, "scaled_dot_product_attention": 1.1}
    monkeypatch.setattr(attention_choice, "_seconds", lambda attention, like, **kw: seconds[attention.__name__])
    assert choose_attention((2, 3, 16, 8), torch.bfloat16) is False


def test_float32_and_steps_without_gradients_are_never_measured(fresh_choices):
    assert choose_attention((2, 3, 16, 8), torch.float32) is False
    q, k, v = qkv(dtype=torch.bfloat16)
    with torch.no_grad():
        out = causal_attention(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert attention_choice._CHOSEN == {}
