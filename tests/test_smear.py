"""The smear (modded-nanogpt): each token's embedding plus its predecessor's, times a learned gate
that starts at 0; in training, after a KV cache, with left-padded rows and in DecodeStep."""

import torch

from gptlab.cli import main
from gptlab.models.decode_step import DecodeStep
from gptlab.training.optim import hidden_matrices

from helpers import (
    assert_causal_and_learning,
    assert_hf_export_refused,
    full_and_cached_logits,
    random_ids,
    tiny_gpt,
    train_with_an_option,
)


def smeared_gpt(**fields):
    """A tiny GPT with the smear at strength 1.5 and a gate that differs by token."""
    model = tiny_gpt(smear=True, **fields)
    with torch.no_grad():
        model.smear_strength.fill_(1.5)
        model.smear_gate.copy_(torch.linspace(-3.0, 3.0, model.smear_gate.numel()))
    return model


def test_each_token_gets_its_predecessor_times_the_gate_and_the_first_none():
    model = tiny_gpt(smear=True)
    with torch.no_grad():
        model.smear_strength.fill_(2.0)  # the gate's weights at 0 open it halfway: 2 * sigmoid(0) = 1
    x = torch.randn(2, 5, 32)
    smeared = model.smear(x, kv_cache=None, positions=None)
    torch.testing.assert_close(smeared[:, 0], x[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(smeared[:, 1:], x[:, 1:] + x[:, :-1])


def test_at_strength_zero_it_computes_exactly_the_model_without_it():
    plain, model = tiny_gpt(), tiny_gpt(smear=True)  # the same seed: the same weights
    assert model.smear_strength.item() == 0.0 and not model.smear_gate.any()
    assert set(model.state_dict()) - set(plain.state_dict()) == {"smear_strength", "smear_gate"}
    idx = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=0, atol=0)
    assert plain.smear_gate is None and plain.smear_strength is None


def test_it_leaves_the_first_position_alone_stays_causal_and_learns():
    plain, model = tiny_gpt(), smeared_gpt()
    idx = random_ids(2, 16)
    with torch.no_grad():
        plain_logits, logits = plain(idx)[0], model(idx)[0]
    torch.testing.assert_close(logits[:, 0], plain_logits[:, 0], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 1:], plain_logits[:, 1:], atol=1e-3)
    assert_causal_and_learning(model, idx)


def test_a_kv_cache_gives_the_full_forwards_logits():
    model = smeared_gpt(qk_norm=True, pos_encoding="learned")
    idx = random_ids(2, 12)
    full, cached = full_and_cached_logits(model, idx, prefill=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_a_left_padded_row_decodes_as_it_would_alone():
    model = smeared_gpt()
    short, long = random_ids(1, 4, seed=2)[0], random_ids(1, 7, seed=3)[0]
    padded = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])  # (2, 7)
    following = torch.tensor([5, 9])  # one more id for each row, decoded one step
    with torch.no_grad():
        cache = model.new_kv_cache(2, pad=torch.tensor([3, 0]))
        batch_prefill = model(padded, kv_cache=cache, last_only=True)[0][:, -1]
        batch_step = DecodeStep(model)(following, cache)
        for row, ids in enumerate([short, long]):
            alone = model.new_kv_cache(1)
            torch.testing.assert_close(batch_prefill[row], model(ids[None], kv_cache=alone, last_only=True)[0][0, -1])
            torch.testing.assert_close(batch_step[row], DecodeStep(model)(following[row : row + 1], alone)[0])


def test_its_two_parameters_go_to_adamw_without_weight_decay():
    model = tiny_gpt(smear=True)
    smear = {id(model.smear_strength), id(model.smear_gate)}
    assert not smear & {id(p) for p in hidden_matrices(model)}
    (undecayed,) = [group for group in model.configure_optimizer_groups(weight_decay=0.1) if not group["weight_decay"]]
    assert smear <= {id(p) for p in undecayed["params"]}


def test_trained_from_the_command_line_it_generates_past_its_context_and_refuses_a_foreign_export(tmp_path, capsys):
    checkpoint, saved = train_with_an_option(tmp_path, "--smear")
    assert saved["model_config"]["smear"] and saved["model"]["smear_gate"].shape == (12,)
    # 40 tokens after a context of 16: the window restarts (a new cache) on the way.
    assert main(["generate", "--model_path", str(checkpoint), "--prompt", "to be", "--length", "40"]) == 0
    assert_hf_export_refused(checkpoint, tmp_path, capsys, "smear")
