"""Loading Hugging Face GPT-2 weights: same logits as transformers, clear errors otherwise."""

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=32,
        vocab_size=100,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # perturb every weight, so that norms and biases are not 1s and 0s
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def gpt2_config(**overrides) -> ModelConfig:
    values = dict(
        embed_dim=64,
        n_heads=4,
        num_layers=2,
        seq_len=32,
        tgt_vocab_size=100,
        dropout=0.0,
        bias=True,
        pos_encoding="learned",
        norm="layernorm",
        activation="gelu",
        tie_embeddings=True,
        norm_eps=1e-5,
    )
    return ModelConfig(**(values | overrides))


def test_loaded_gpt2_gives_the_same_logits_as_transformers(hf_gpt2):
    ours = GPT.from_hf_gpt2(hf_gpt2.state_dict(), gpt2_config()).eval()
    idx = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_gpt2(idx).logits
        got, _ = ours(idx)
    assert (got - expected).abs().max().item() < 1e-4
    assert ours.lm_head.weight is ours.wte.weight


@pytest.mark.parametrize(
    "field, value",
    [
        ("pos_encoding", "rope"),
        ("norm", "rmsnorm"),
        ("activation", "swiglu"),
        ("bias", False),
        ("tie_embeddings", False),
    ],  # fmt: skip
)
def test_a_config_that_is_not_gpt2_is_named(hf_gpt2, field, value):
    with pytest.raises(GptlabError, match=field):
        GPT.from_hf_gpt2(hf_gpt2.state_dict(), gpt2_config(**{field: value}))


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"seq_len": 16}, "wpe.weight"),
        ({"tgt_vocab_size": 128}, "wte.weight"),
        ({"expansion_factor": 2}, "h.0.mlp.c_fc.weight"),
        ({"num_layers": 1}, "h.1."),
        ({"num_layers": 3}, "h.2."),
    ],
)
def test_weights_that_do_not_fit_the_config_are_named(hf_gpt2, overrides, named):
    with pytest.raises(GptlabError, match=named):
        GPT.from_hf_gpt2(hf_gpt2.state_dict(), gpt2_config(**overrides))
