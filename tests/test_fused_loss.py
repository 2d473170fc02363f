"""linear_cross_entropy: the head and the loss a slice at a time, equal to the plain path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig
from gptlab.device import autocast
from gptlab.models import GPT
from gptlab.models.fused_loss import IGNORE_INDEX, cap_logits, linear_cross_entropy


def problem(rows=70, width=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=generator, requires_grad=True)
    weight = torch.randn(vocab, width, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::7] = IGNORE_INDEX  # positions without a target count for nothing
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden, weight, targets, scale=1.0):
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_rows", [1, 16, 64, 70, 1000])  # 16 and 64 leave a short last slice
def test_loss_and_gradients_equal_the_plain_path(chunk_rows):
    hidden, weight, targets = problem()
    want = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows), hidden, weight, targets)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [16, 1000])
def test_a_soft_cap_gives_the_loss_and_gradients_of_the_capped_logits(chunk_rows):
    hidden, weight, targets = problem()  # logits of spread ~4: a cap of 3 bends most of them

    def capped(h, w, t):
        return F.cross_entropy(cap_logits(F.linear(h, w), 3.0), t, ignore_index=IGNORE_INDEX)

    want = loss_and_grads(capped, hidden, weight, targets)
    got = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows, softcap=3.0), hidden, weight, targets
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (want[0] - plain(hidden, weight, targets)).abs() > 0.1  # the cap changed the loss
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, softcap=3.0), want[0])


def test_cap_logits_bounds_the_logits_and_leaves_small_ones_almost_as_they_are():
    logits = torch.tensor([-1e4, -30.0, -0.01, 0.0, 0.01, 30.0, 1e4])
    capped = cap_logits(logits, 15.0)
    assert capped.abs().max() < 15.0 + 1e-5 and torch.equal(capped.sign(), logits.sign())
    torch.testing.assert_close(capped[2:5], logits[2:5], rtol=1e-6, atol=0)
    assert cap_logits(logits, None) is logits


def test_the_upstream_gradient_scales_the_result():
    hidden, weight, targets = problem()
    _, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    _, scaled_hidden, scaled_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale=1024.0)
    torch.testing.assert_close(scaled_hidden, 1024 * grad_hidden)  # what a GradScaler relies on
    torch.testing.assert_close(scaled_weight, 1024 * grad_weight)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight, targets = problem()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, 16), plain(hidden, weight, targets))


def test_nothing_to_count_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = problem()
    targets = torch.full((hidden.size(0),), IGNORE_INDEX)
    loss, grad_hidden, grad_weight = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert loss.item() == 0 and not grad_hidden.any() and not grad_weight.any()


@pytest.mark.parametrize("return_logits", [True, False])
def test_gpt_gives_zero_loss_for_a_batch_with_nothing_to_count_on_both_paths(return_logits):
    config = ModelConfig(embed_dim=32, num_layers=1, n_heads=4, seq_len=8, tgt_vocab_size=50, dropout=0.0)
    model = GPT(config)
    x = torch.randint(0, 50, (2, 8))
    _, loss = model(x, torch.full((2, 8), IGNORE_INDEX), return_logits=return_logits)
    loss.backward()
    assert loss.item() == 0 and all(not p.grad.any() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_without_logits_trains_like_the_plain_loss(dtype, tied):
    config = ModelConfig(
        embed_dim=32, num_layers=2, n_heads=4, seq_len=16, tgt_vocab_size=97, dropout=0.0, tie_embeddings=tied
    )
    torch.manual_seed(0)
    plain_model = GPT(config)  # tied: the head's gradient adds to the embedding table's
    fused_model = copy.deepcopy(plain_model)
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    y[0, :4] = IGNORE_INDEX
    with autocast(torch.device("cpu"), dtype):
        logits, want = plain_model(x, y)
        none, got = fused_model(x, y, return_logits=False)
    assert logits.shape == (3, 16, 97) and none is None
    want.backward(), got.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.02, "atol": 1e-3}
    torch.testing.assert_close(got, want, **tolerance)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tolerance, msg=name)


def test_a_capped_gpt_trains_alike_on_both_paths_and_its_logits_stay_under_the_cap():
    config = ModelConfig(
        embed_dim=32, num_layers=2, n_heads=4, seq_len=16, tgt_vocab_size=97, dropout=0.0, logit_softcap=0.5
    )
    torch.manual_seed(0)
    plain_model = GPT(config)
    with torch.no_grad():
        plain_model.wte.weight.mul_(10)  # logits of spread ~1: the cap of 0.5 bends most of them
    fused_model = copy.deepcopy(plain_model)
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    logits, want = plain_model(x, y)
    _, got = fused_model(x, y, return_logits=False)
    assert 0.4 < logits.abs().max() <= 0.5
    want.backward(), got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_gradients_keep_their_precision_over_many_positions():
    # Each position's gradient is divided by the number of positions; done before the fp16
    # products, that division would push them towards fp16's underflow (relative error 3e-3 here).
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(4096, 8), 0.02 * torch.randn(16, 8), torch.randint(0, 16, (4096,))
    _, want_hidden, want_weight = loss_and_grads(plain, hidden, weight, targets)

    def fused_in_fp16(h, w, t):
        with torch.autocast("cpu", dtype=torch.float16):
            return linear_cross_entropy(h, w, t)

    _, got_hidden, got_weight = loss_and_grads(fused_in_fp16, hidden, weight, targets)
    assert (got_hidden - want_hidden).norm() / want_hidden.norm() < 1e-3
    assert (got_weight - want_weight).norm() / want_weight.norm() < 1e-3
