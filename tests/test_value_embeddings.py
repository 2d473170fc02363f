"""Value embeddings (modded-nanogpt): token tables added to the attention values of the first
and last layers; and the limits of the GPT-only options (value embeddings, logit soft cap, U-net skips, smear)."""

import pytest
import torch
from pydantic import ValidationError

from gptlab.config import ModelConfig
from gptlab.training.optim import hidden_matrices

from helpers import TINY_VOCAB as VOCAB
from helpers import assert_causal_and_learning, full_and_cached_logits, random_ids, tiny_gpt


@pytest.mark.parametrize(
    "tables, layers, fed",
    [(0, 4, [None] * 4), (1, 4, [0, None, None, 0]), (2, 4, [0, 1, 0, 1]), (2, 6, [0, 1, None, None, 0, 1])],
)
def test_table_j_feeds_layer_j_and_the_jth_of_the_last_layers(tables, layers, fed):
    model = tiny_gpt(value_embeddings=tables, num_layers=layers)
    assert len(model.value_embeds) == tables
    assert [model.value_table(layer) for layer in range(layers)] == fed


def test_zero_tables_compute_exactly_the_model_without_them():
    plain = tiny_gpt(value_embeddings=0)
    with_tables = tiny_gpt(value_embeddings=2)
    state = plain.state_dict() | {f"value_embeds.{j}.weight": torch.zeros(VOCAB, 32) for j in range(2)}
    with_tables.load_state_dict(state)
    idx = random_ids(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(with_tables(idx)[0], plain(idx)[0], rtol=0, atol=0)


def test_the_tables_change_the_output_keep_it_causal_and_learn():
    model = tiny_gpt(value_embeddings=1)
    idx = random_ids(2, 16)
    before = model(idx)[0].detach()
    with torch.no_grad():
        model.value_embeds[0].weight.add_(torch.randn_like(model.value_embeds[0].weight))
        assert not torch.allclose(model(idx)[0], before, atol=1e-3)
    assert_causal_and_learning(model, idx)
    rows_used = model.value_embeds[0].weight.grad.abs().sum(dim=1) > 0
    assert torch.equal(rows_used, torch.isin(torch.arange(VOCAB), idx))  # a lookup: only the rows read learn


def test_a_kv_cache_gives_the_full_forwards_logits():
    model = tiny_gpt(value_embeddings=2, logit_softcap=3.0, qk_norm=True)
    idx = random_ids(2, 12)
    full, cached = full_and_cached_logits(model, idx, prefill=5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert full.abs().max() < 3.0


def test_muon_leaves_the_tables_to_adamw():
    model = tiny_gpt(value_embeddings=1)
    hidden = {id(p) for p in hidden_matrices(model)}
    assert id(model.value_embeds[0].weight) not in hidden and len(hidden) == 4 * 4  # qkv, proj, fc, proj a layer


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_layers=4, value_embeddings=3), r"value_embeddings \(3\) feeds two layers each: at most .* \(2\)"),
        (dict(model="transformer", value_embeddings=1), "are for GPTs"),
        (dict(model="transformer", logit_softcap=30.0), "are for GPTs"),
        (dict(model="transformer", unet_skips=True), "unet_skips and smear are for GPTs"),
        (dict(model="transformer", smear=True), "smear are for GPTs"),
        (dict(logit_softcap=0.0), "greater than 0"),
    ],
)
def test_options_a_model_cannot_have_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(embed_dim=32, n_heads=4, tgt_vocab_size=VOCAB, **fields)
