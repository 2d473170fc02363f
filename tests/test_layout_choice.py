"""Layouts chosen by measurement: the fastest candidate is kept per shape, cached, and never
changes a result beyond float rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig
from gptlab.generation import ready_for_generation
from gptlab.models import GPT, layout_choice
from gptlab.models.layout_choice import choose_layouts, forget_layout_choices
from gptlab.models.matvec import MatVecLinear, layouts_for, use_matvec_linears

pytestmark = pytest.mark.usefixtures("eager_decoding")  # layouts are for DecodeStep (conftest.py)


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}-threads")
def threads(request, monkeypatch):
    monkeypatch.setattr(layout_choice, "MAX_TOTAL_S", 60)  # measure every shape, however busy the machine
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    forget_layout_choices()
    yield request.param
    forget_layout_choices()
    torch.set_num_threads(before)


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(embed_dim=64, n_heads=4, num_layers=2, seq_len=32, tgt_vocab_size=96, dropout=0.0)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def test_every_shape_gets_its_fastest_measured_layout(threads):
    model = small_gpt()
    use_matvec_linears(model)
    choices = choose_layouts(model)
    linears = [m for m in model.modules() if isinstance(m, MatVecLinear)]
    shapes = {(m.in_features, m.out_features) for m in linears}
    assert {(c.n_in, c.n_out) for c in choices} == shapes  # one choice per distinct shape
    for choice in choices:
        assert set(choice.seconds) == set(layouts_for(choice.n_in, choice.n_out, threads))  # every candidate timed
        assert choice.layout == min(choice.seconds, key=choice.seconds.get)
        same_shape = [m for m in linears if (m.in_features, m.out_features) == (choice.n_in, choice.n_out)]
        assert choice.count == len(same_shape) and all(m.layout == choice.layout for m in same_shape)


def test_the_choice_never_changes_results_beyond_float_rounding(threads, monkeypatch):
    reference = small_gpt()
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = torch.cat([reference(ids[:, : t + 1])[0][:, -1:] for t in range(12)], dim=1)  # (1, 12, V)
    # Force each candidate in turn to be the "fastest", so every layout a shape can take is checked.
    real_measure = layout_choice._measure
    for forced in range(4):
        forget_layout_choices()

        def measure(layers, splits, deadline, forced=forced):
            choice = real_measure(layers, splits, deadline)
            layouts = list(choice.seconds)
            pick = layouts[min(forced, len(layouts) - 1)]
            return layout_choice.LayoutChoice(choice.n_in, choice.n_out, choice.count, pick, choice.seconds)

        monkeypatch.setattr(layout_choice, "_measure", measure)
        model = ready_for_generation(copy.deepcopy(reference))
        with torch.no_grad():
            cache = model.new_kv_cache(batch=1)
            steps = torch.cat([model(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(12)], dim=1)
        torch.testing.assert_close(steps, want, rtol=0, atol=1e-5)


def test_a_shape_is_measured_once_per_process(threads, monkeypatch):
    calls = []
    real_measure = layout_choice._measure
    monkeypatch.setattr(layout_choice, "_measure", lambda *a: calls.append(a[0][0].in_features) or real_measure(*a))
    first = ready_for_generation(small_gpt(seed=0))
    measured = len(calls)
    assert measured == len({(m.in_features, m.out_features) for m in first.modules() if isinstance(m, MatVecLinear)})
    second = ready_for_generation(small_gpt(seed=1))  # same shapes, other weights
    assert len(calls) == measured
    kept = {(m.in_features, m.out_features): m.layout for m in first.modules() if isinstance(m, MatVecLinear)}
    for module in second.modules():
        if isinstance(module, MatVecLinear):
            assert module.layout == kept[(module.in_features, module.out_features)]


def test_past_the_time_limit_shapes_keep_the_default_uncached(threads):
    model = small_gpt()
    use_matvec_linears(model)
    choices = choose_layouts(model, max_total_s=0)
    assert all(choice.seconds == {} for choice in choices)
    assert all(choice.seconds for choice in choose_layouts(model))  # measured now


def test_a_model_made_ready_still_trains(threads):
    model = small_gpt()
    reference = copy.deepcopy(model)
    ready_for_generation(model)
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    for net in (model, reference):
        net.train()
        _, loss = net(x, x)
        loss.backward()
    for (name, param), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # a one-row product after training sees the updated weights
        layer = model.blocks[0].mlp.fc
        layer.weight.mul_(0.5)
        row = torch.randn(1, 1, layer.in_features)
        torch.testing.assert_close(layer(row), F.linear(row, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
