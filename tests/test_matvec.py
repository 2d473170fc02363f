"""MatVecLinear: the same products as nn.Linear, in a layout and split made for one-row inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.models.matvec import LAYOUTS, MIN_WEIGHTS_TO_SPLIT, MatVecLinear, layouts_for, use_matvec_linears

SHAPES = [(384, 1152), (1536, 384), (512, 512), (128, 8192), (96, 64)]  # (in, out): wide, tall, square, small


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def linear_pair(n_in: int, n_out: int, bias: bool = True) -> tuple[nn.Linear, MatVecLinear]:
    torch.manual_seed(n_in + n_out)
    reference = nn.Linear(n_in, n_out, bias=bias)
    if bias:
        with torch.no_grad():
            reference.bias.normal_()  # nonzero, so that adding it is tested
    clone = nn.Linear(n_in, n_out, bias=bias)
    clone.load_state_dict(reference.state_dict())
    return reference, MatVecLinear.from_linear(clone)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_one_row_products_equal_nn_linear(n_in, n_out, bias, threads, monkeypatch):
    reference, fast = linear_pair(n_in, n_out, bias)
    bmm_calls = []
    real_bmm, real_baddbmm = torch.bmm, torch.baddbmm
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm_calls.append(1) or real_bmm(*a))
    monkeypatch.setattr(torch, "baddbmm", lambda *a: bmm_calls.append(1) or real_baddbmm(*a))
    for shape in [(1, 1, n_in), (1, n_in), (n_in,)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want, got = reference(x), fast(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    divisible = (n_in if n_out >= n_in else n_out) % threads == 0
    split = threads > 1 and n_in * n_out >= MIN_WEIGHTS_TO_SPLIT and divisible
    assert bool(bmm_calls) == split  # the split path is the one under test whenever it applies


def test_many_rows_take_the_plain_product():
    reference, fast = linear_pair(384, 1152)
    x = torch.randn(2, 5, 384)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)


def test_layout_follows_the_shape_and_values_stay():
    for n_in, n_out in [(384, 1152), (1536, 384)]:
        reference, fast = linear_pair(n_in, n_out)
        assert torch.equal(fast.weight, reference.weight) and fast.weight.shape == (n_out, n_in)
        wide = n_out >= n_in
        assert fast.weight.t().is_contiguous() == wide and fast.weight.is_contiguous() == (not wide)


def test_use_matvec_linears_keeps_parameters_ties_and_state_dict():
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 50))
    model[4].weight = model[0].weight  # a tied output head
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        want = model(ids)

    use_matvec_linears(model)

    assert [type(m) for m in model] == [nn.Embedding, MatVecLinear, nn.ReLU, MatVecLinear, MatVecLinear]
    assert model[4].weight is model[0].weight
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_split_product(threads):
    reference, fast = linear_pair(512, 512)
    x = torch.randn(1, 512)
    F.mse_loss(reference(x), torch.zeros(1, 512)).backward()
    F.mse_loss(fast(x), torch.zeros(1, 512)).backward()
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_every_layout_gives_nn_linears_results(n_in, n_out, bias, threads):
    reference, fast = linear_pair(n_in, n_out, bias)
    one_row, rows = torch.randn(1, 1, n_in), torch.randn(3, n_in)
    with torch.no_grad():
        want_one, want_rows = reference(one_row), reference(rows)
        for layout in layouts_for(n_in, n_out, threads):
            fast.set_layout(layout)
            assert torch.equal(fast.weight, reference.weight), layout
            torch.testing.assert_close(fast(one_row), want_one, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast(one_row.view(n_in)), want_one.view(n_out), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast(rows), want_rows, rtol=1e-5, atol=1e-5)


def test_split_layouts_are_offered_only_where_they_fit():
    assert layouts_for(384, 1152, 1) == ["plain", "transposed"]
    assert layouts_for(384, 1152, 2) == list(LAYOUTS)
    assert layouts_for(385, 1152, 2) == ["plain", "transposed", "plain_split"]
    _, fast = linear_pair(385, 1151)
    with pytest.raises(ValueError, match="does not fit"):
        fast.set_layout("transposed_split", 2)


def test_a_kept_split_view_follows_a_replaced_weight(threads):
    reference, fast = linear_pair(512, 512)
    x = torch.randn(1, 512)
    for layout in layouts_for(512, 512, threads):
        fast.set_layout(layout)
        with torch.no_grad():
            fast(x)  # keeps the view of a split layout
            fast.weight.data = fast.weight.data * 2  # e.g. what .to() or loading a state dict does
            reference.weight.data = reference.weight.data * 2
            torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
