"""The GPT model: shapes, causality, positional encodings, sizes, init, and that it can learn."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT, blocks
from gptlab.models.blocks import LearnedPositions, RotaryEmbedding, SinusoidalPositions, apply_rotary

from helpers import assert_causal_and_learning


def tiny_config(**overrides) -> ModelConfig:
    values = dict(embed_dim=32, n_heads=4, num_layers=2, seq_len=16, tgt_vocab_size=40, dropout=0.0)
    return ModelConfig(**(values | overrides))


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


def random_ids(B: int, T: int, V: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def as_tuple(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


POS_ENCODINGS = ["rope", "sinusoidal", "learned"]


@pytest.mark.parametrize(
    "pos_encoding, norm, activation, bias",
    list(itertools.product(POS_ENCODINGS, ["layernorm", "rmsnorm"], ["gelu", "relu2", "swiglu"], [False, True])),
)
def test_every_combination_runs_forward_and_backward(pos_encoding, norm, activation, bias):
    model = tiny_model(pos_encoding=pos_encoding, norm=norm, activation=activation, bias=bias).train()
    idx, targets = random_ids(2, 16), random_ids(2, 16, seed=2)

    logits, loss = model(idx, targets)
    loss.backward()

    assert logits.shape == (2, 16, 40) and logits.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(40), rel=0.1)  # small init: near-uniform predictions
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_changing_a_token_never_changes_earlier_logits(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    idx = random_ids(2, 12)
    with torch.no_grad():
        reference, _ = model(idx)
        for t in (0, 5, 11):
            changed = idx.clone()
            changed[:, t] = (changed[:, t] + 1) % 40
            logits, _ = model(changed)
            torch.testing.assert_close(logits[:, :t], reference[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, t], reference[:, t])


def test_logits_without_targets_and_loss_ignores_minus_100():
    model = tiny_model()
    idx, targets = random_ids(2, 10), random_ids(2, 10, seed=3)
    targets[0, :4] = -100
    targets[1, 7] = -100

    logits, loss = model(idx, targets)
    assert model(idx)[1] is None
    keep = targets != -100
    expected = -F.log_softmax(logits, dim=-1)[keep].gather(1, targets[keep].unsqueeze(1)).mean()
    torch.testing.assert_close(loss, expected)


# ---- positional encodings and start_pos ------------------------------------------------------


@pytest.mark.parametrize(
    "encoding",
    [LearnedPositions(16, 6), SinusoidalPositions(16, 6), SinusoidalPositions(16, 7), RotaryEmbedding(8, 16, 500)],
    ids=["learned", "sinusoidal", "sinusoidal-odd-dim", "rope"],
)
def test_positions_at_an_offset_are_the_slice_of_the_full_table(encoding):
    full = encoding(16)
    for start_pos, T in [(0, 16), (3, 5), (15, 1), (9, 7)]:
        at_offset = encoding(T, start_pos)
        for part, whole in zip(as_tuple(at_offset), as_tuple(full)):  # rope gives (cos, sin)
            assert torch.equal(part, whole[start_pos : start_pos + T])


def test_sinusoidal_table_alternates_sin_and_cos_with_falling_frequency():
    table = SinusoidalPositions(20, 8).table  # (20, 8)
    pos = torch.arange(20.0)
    for i in range(4):
        freq = 10000 ** (-2 * i / 8)
        torch.testing.assert_close(table[:, 2 * i], torch.sin(pos * freq))
        torch.testing.assert_close(table[:, 2 * i + 1], torch.cos(pos * freq))


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    rotary = RotaryEmbedding(head_dim=8, seq_len=32, theta=10000.0)
    q, k = torch.randn(2, 1, 1, 1, 8)  # one vector each, (B=1, nh=1, T=1, hs=8)

    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        q_rot, k_rot = apply_rotary(q, rotary(1, q_pos)), apply_rotary(k, rotary(1, k_pos))
        return (q_rot * k_rot).sum()

    assert torch.allclose(apply_rotary(q, rotary(1, 7)).norm(), q.norm())  # a rotation
    torch.testing.assert_close(score(5, 2), score(25, 22))
    torch.testing.assert_close(score(2, 5), score(20, 23))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_rope_model_gives_the_same_logits_at_any_offset():
    # With RoPE, attention sees only relative positions, so shifting all positions changes nothing.
    model = tiny_model(pos_encoding="rope")
    idx = random_ids(2, 6)
    with torch.no_grad():
        at_zero, _ = model(idx)
        for start_pos in (1, 10):
            torch.testing.assert_close(model(idx, start_pos=start_pos)[0], at_zero, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_encoding, table", [("learned", "weight"), ("sinusoidal", "table")])
def test_absolute_positions_at_an_offset_use_the_shifted_rows(pos_encoding, table):
    model = tiny_model(pos_encoding=pos_encoding)
    shifted = copy.deepcopy(model)
    start_pos = 5
    with torch.no_grad():
        rows = getattr(shifted.wpe, table)
        rows.copy_(rows.roll(-start_pos, dims=0))  # row p of shifted = row p + start_pos of model
        idx = random_ids(2, 8)
        torch.testing.assert_close(model(idx, start_pos=start_pos)[0], shifted(idx)[0])
        assert not torch.allclose(model(idx, start_pos=start_pos)[0], model(idx)[0])


def test_positions_past_the_context_are_a_clear_error():
    model = tiny_model()
    with pytest.raises(GptlabError, match="seq_len=16"):
        model(random_ids(1, 17))
    with pytest.raises(GptlabError, match="seq_len=16"):
        model(random_ids(1, 4), start_pos=13)
    with pytest.raises(GptlabError, match="shape"):
        model(random_ids(1, 4)[0])


# ---- parameters, sizes, init -----------------------------------------------------------------


def test_tied_embeddings_share_one_tensor_through_training():
    model = tiny_model(tie_embeddings=True).train()
    assert model.lm_head.weight is model.wte.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(random_ids(2, 8), random_ids(2, 8, seed=4))[1].backward()
    optimizer.step()
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()

    untied = tiny_model(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_params() - model.num_params() == 40 * 32


def test_num_params_and_flops_match_a_hand_count():
    V, T, C, L = 11, 5, 8, 2
    gpt2_like = GPT(
        ModelConfig(
            embed_dim=C,
            n_heads=2,
            num_layers=L,
            seq_len=T,
            tgt_vocab_size=V,
            bias=True,
            pos_encoding="learned",
            norm="layernorm",
            activation="gelu",
        )
    )
    block = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert gpt2_like.num_params(non_embedding=True) == L * block + 2 * C
    assert gpt2_like.num_params() == V * C + T * C + L * block + 2 * C  # head tied: counted once
    assert gpt2_like.flops_per_token() == 6 * (L * block + 2 * C + V * C) + 12 * L * T * C

    llama_like = GPT(
        ModelConfig(
            embed_dim=C,
            n_heads=2,
            num_layers=L,
            seq_len=T,
            tgt_vocab_size=V,
            bias=False,
            pos_encoding="rope",
            norm="rmsnorm",
            activation="swiglu",
            tie_embeddings=False,
        )
    )
    hidden = 24  # 2/3 * 4 * 8 = 21.3, rounded up to a multiple of 8
    block = C + 3 * C * C + C * C + C + 3 * C * hidden
    assert llama_like.num_params() == V * C + L * block + C + C * V


def test_swiglu_keeps_the_mlp_about_as_large_as_gelu():
    for C, expansion in [(64, 4), (384, 4), (100, 3)]:
        config = tiny_config(embed_dim=C, n_heads=2, expansion_factor=expansion)
        hidden = blocks.swiglu_hidden_dim(config)
        assert hidden % 8 == 0 and 2 * expansion * C / 3 <= hidden < 2 * expansion * C / 3 + 8
        swiglu, gelu = (blocks.MLP(config.model_copy(update={"activation": a})) for a in ("swiglu", "gelu"))
        ratio = sum(p.numel() for p in swiglu.parameters()) / sum(p.numel() for p in gelu.parameters())
        assert 1.0 <= ratio < 1.1


def test_init_is_gpt2_style():
    torch.manual_seed(0)
    model = GPT(
        tiny_config(
            embed_dim=256,
            n_heads=4,
            num_layers=8,
            bias=True,
            tie_embeddings=False,
            pos_encoding="learned",
            tgt_vocab_size=512,
            seq_len=64,
        )
    )
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            assert param.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif param.dim() == 2:
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert torch.all(param == 0), name
        else:
            assert torch.all(param == 1), name  # norm gains


def test_optimizer_groups_decay_matrices_only_and_cover_every_parameter():
    model = tiny_model(bias=True, pos_encoding="learned")
    decay, no_decay = model.configure_optimizer_groups(weight_decay=0.1)

    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()
    torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-3)  # accepted as is


@pytest.mark.parametrize("kind", ["gpt", "transformer"])
def test_optimizer_groups_leave_out_frozen_parameters(kind):
    """What a LoRA run relies on: a base model's frozen weights never reach the optimizer."""
    from gptlab.models.transformer import Transformer

    model = tiny_model() if kind == "gpt" else Transformer(tiny_config(model="transformer"))
    frozen = [p for name, p in model.named_parameters() if "attn." not in name]
    for param in frozen:
        param.requires_grad_(False)
    grouped = {id(p) for group in model.configure_optimizer_groups(0.1) for p in group["params"]}
    assert grouped and not grouped & {id(p) for p in frozen}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


# ---- QK-norm and zero-initialised projections ---------------------------------------------------


def scale_queries_and_keys(model, query_scale: float, key_scale: float) -> None:
    """Multiply every layer's query and key weights (the first two thirds of qkv) by a constant."""
    with torch.no_grad():
        for block in model.blocks:
            q, k, _ = block.attn.qkv.weight.chunk(3, dim=0)
            q.mul_(query_scale)
            k.mul_(key_scale)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(pos_encoding):
    idx = random_ids(2, 12)
    for qk_norm in (True, False):
        model = tiny_model(pos_encoding=pos_encoding, qk_norm=qk_norm, norm_eps=1e-10)
        scaled = copy.deepcopy(model)
        scale_queries_and_keys(scaled, 8.0, 3.0)
        with torch.no_grad():
            same = torch.allclose(scaled(idx)[0], model(idx)[0], rtol=0, atol=1e-5)
        assert same == qk_norm  # without QK-norm the attention logits grow 24-fold and the output changes


def test_qk_norm_normalises_each_heads_query_and_key_to_unit_rms(monkeypatch):
    model = tiny_model(qk_norm=True, pos_encoding="learned", norm_eps=1e-10)
    seen = []
    monkeypatch.setattr(blocks.CausalSelfAttention, "attend", lambda self, q, k, v, mask=None: seen.append((q, k)) or v)
    with torch.no_grad():
        model(random_ids(2, 12))
    assert len(seen) == 2
    for q, k in seen:
        for t in (q, k):
            torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(t.shape[:-1]), rtol=0, atol=1e-3)


def test_a_qk_norm_model_is_causal_and_every_parameter_gets_a_gradient():
    assert_causal_and_learning(tiny_model(qk_norm=True), random_ids(2, 16), changed_at=6)


def test_zero_initialised_projections_start_every_block_as_the_identity():
    model = tiny_model(zero_init_projections=True, pos_encoding="rope")
    projections = [block.attn.proj.weight for block in model.blocks] + [block.mlp.proj.weight for block in model.blocks]
    assert all(torch.equal(weight, torch.zeros_like(weight)) for weight in projections)
    idx = random_ids(2, 12)
    with torch.no_grad():  # the blocks add nothing yet: embeddings, final norm, head
        torch.testing.assert_close(model(idx)[0], model.lm_head(model.norm_f(model.wte(idx))), rtol=0, atol=1e-6)
    default = tiny_model(pos_encoding="rope")  # off by default: GPT-2's small random init
    assert all(block.attn.proj.weight.abs().sum() > 0 for block in default.blocks)


def test_missing_vocab_size_is_a_clear_error():
    with pytest.raises(GptlabError, match="tgt_vocab_size"):
        GPT(tiny_config(tgt_vocab_size=None))


# ---- dropout, attention kernels, learning ----------------------------------------------------


def test_dropout_is_active_in_training_only():
    model = tiny_model(dropout=0.5)
    idx = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])
        no_dropout = tiny_model(dropout=0.0)
        assert torch.equal(no_dropout.train()(idx)[0], no_dropout.eval()(idx)[0])


def test_attention_dropout_defaults_to_dropout_and_zero_keeps_attention_deterministic(monkeypatch):
    assert tiny_config(dropout=0.2).attention_dropout_p == 0.2  # None: the old model, unchanged
    assert tiny_config(dropout=0.2, attention_dropout=0.0).attention_dropout_p == 0.0
    seen = []  # the dropout_p every attention call asks for
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, dropout_p=0.0, **kwargs):
        seen.append(dropout_p)
        return sdpa(*args, dropout_p=dropout_p, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", recording_sdpa)
    idx = random_ids(2, 8)
    with torch.no_grad():
        only_attention = tiny_model(dropout=0.0, attention_dropout=0.5).train()
        assert not torch.equal(only_attention(idx)[0], only_attention(idx)[0])
        assert set(seen) == {0.5}
        seen.clear()
        residual_only = tiny_model(dropout=0.5, attention_dropout=0.0).train()
        assert not torch.equal(residual_only(idx)[0], residual_only(idx)[0])  # residual dropout still on
        assert set(seen) == {0.0}  # ... but the attention weights are not dropped: the fused kernel runs


def test_flash_attn_path_passes_batch_time_heads_layout(monkeypatch):
    # flash_attn_func takes and returns (B, T, nh, hs); fake it with SDPA in that layout.
    calls = []

    def fake_flash_attn_func(q, k, v, dropout_p=0.0, causal=False):
        calls.append(q.shape)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal)
        return out.transpose(1, 2)

    model = tiny_model(n_heads=4)
    idx = random_ids(2, 8)
    with torch.no_grad():
        expected, _ = model(idx)
        monkeypatch.setattr(blocks, "flash_attn_func", fake_flash_attn_func)
        monkeypatch.setattr(blocks, "use_flash_attn", lambda q: True)
        got, _ = model(idx)
    assert calls and calls[0] == (2, 8, 4, 8)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_overfits_one_small_batch(pos_encoding):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_encoding=pos_encoding, tgt_vocab_size=32)).train()
    idx = random_ids(4, 16, V=32)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
