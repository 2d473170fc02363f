"""U-net skip connections (modded-nanogpt): the output of each layer of the first half is added,
times a learned weight, to the input of its mirror layer in the second half."""

import pytest
import torch

from gptlab.cli import main
from gptlab.training.optim import hidden_matrices

from helpers import (
    assert_causal_and_learning,
    assert_hf_export_refused,
    full_and_cached_logits,
    random_ids,
    tiny_gpt,
    train_with_an_option,
)


@pytest.mark.parametrize(
    "layers, fed", [(1, [None]), (2, [None, 0]), (4, [None, None, 1, 0]), (5, [None] * 3 + [1, 0])]
)
def test_layer_j_of_the_first_half_feeds_layer_num_layers_minus_1_minus_j(layers, fed):
    model = tiny_gpt(num_layers=layers, unet_skips=True)
    assert (0 if model.skip_weights is None else len(model.skip_weights)) == layers // 2
    outputs = [torch.full((1, 32), 10.0**j) for j in range(layers // 2)]  # which output was added shows
    added = [(model.add_skip(torch.zeros(1, 32), layer, outputs)[0, 0].item()) for layer in range(layers)]
    assert added == [0.0 if j is None else 10.0**j for j in fed]


def test_skips_weighted_zero_compute_exactly_the_model_without_them():
    plain = tiny_gpt()
    with_skips = tiny_gpt(unet_skips=True)
    with_skips.load_state_dict(plain.state_dict() | {"skip_weights": torch.zeros(2)})
    idx = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_skips(idx)[0], plain(idx)[0], rtol=0, atol=0)
    assert plain.skip_weights is None and "skip_weights" not in plain.state_dict()


def test_the_skips_change_the_output_keep_it_causal_and_learn():
    plain, model = tiny_gpt(), tiny_gpt(unet_skips=True)
    assert torch.equal(model.skip_weights, torch.ones(2))
    idx = random_ids(2, 16)
    with torch.no_grad():
        assert not torch.allclose(model(idx)[0], plain(idx)[0], atol=1e-3)
    assert_causal_and_learning(model, idx)
    assert (model.skip_weights.grad != 0).all()


def test_a_kv_cache_gives_the_full_forwards_logits():
    model = tiny_gpt(num_layers=5, unet_skips=True, qk_norm=True)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.5, -2.0]))
    idx = random_ids(2, 12)
    full, cached = full_and_cached_logits(model, idx, prefill=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_the_skip_weights_go_to_adamw_without_weight_decay():
    model = tiny_gpt(unet_skips=True)
    assert id(model.skip_weights) not in {id(p) for p in hidden_matrices(model)}
    groups = model.configure_optimizer_groups(weight_decay=0.1)
    (undecayed,) = [group for group in groups if group["weight_decay"] == 0.0]
    assert any(p is model.skip_weights for p in undecayed["params"])


def test_trained_from_the_command_line_they_generate_and_refuse_a_foreign_export(tmp_path, capsys):
    checkpoint, saved = train_with_an_option(tmp_path, "--unet_skips")
    assert saved["model_config"]["unet_skips"] and saved["model"]["skip_weights"].shape == (1,)
    assert main(["generate", "--model_path", str(checkpoint), "--prompt", "to be", "--length", "5"]) == 0
    assert_hf_export_refused(checkpoint, tmp_path, capsys, "unet_skips")
