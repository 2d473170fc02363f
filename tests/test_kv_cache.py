"""The KV cache gives the logits of a full forward pass: step by step, past the context window,
and for left-padded batches of prompts of different lengths."""

import copy

import pytest
import torch

from gptlab.config import ModelConfig, SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate_token_ids, ready_for_generation
from gptlab.generation import gpt as generation_gpt
from gptlab.generation.sampling import sample_next
from gptlab.models import GPT
from gptlab.models.matvec import LAYOUTS, MatVecLinear

POS_ENCODINGS = ["rope", "sinusoidal", "learned"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
VOCAB = 50
PAD = 0


def tiny_model(seq_len: int, pos_encoding: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(
        embed_dim=32,
        n_heads=4,
        num_layers=2,
        seq_len=seq_len,
        tgt_vocab_size=VOCAB,
        dropout=0.0,
        pos_encoding=pos_encoding,
        bias=True,
    )
    model = GPT(config).eval()
    with torch.no_grad():  # a bigger spread of logits than the small init, so differences show
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def recorded(monkeypatch) -> list[torch.Tensor]:
    """Spy on the generation engine: the logits it samples each step's tokens from, (B, V) each.
    Greedy choices made inside the C step (which never show their logits) are turned off."""
    recorded = []

    def recording_sample_next(logits, *args):
        recorded.append(logits.clone())
        return sample_next(logits, *args)

    monkeypatch.setattr(generation_gpt, "sample_next", recording_sample_next)
    monkeypatch.setattr(generation_gpt, "NativeDecodeStep", type("NoStepChoosesGreedily", (), {}))
    return recorded


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_cached_logits_equal_the_full_forward_at_each_of_300_steps(pos_encoding):
    model = tiny_model(seq_len=320, pos_encoding=pos_encoding)
    ids = torch.tensor([random_ids(308, seed=1)])  # (1, 308): an 8-token prompt, then 300 steps
    with torch.no_grad():
        full, _ = model(ids)  # (1, 308, V); causal, so position t sees exactly ids[:, :t+1]
        cache = model.new_kv_cache(batch=1)
        # The prompt in two chunks: the second attends to a past (the bottom-right causal mask).
        model(ids[:, :5], kv_cache=cache)
        logits, _ = model(ids[:, 5:8], kv_cache=cache)
        torch.testing.assert_close(logits, full[:, 5:8], rtol=0, atol=1e-5)
        for t in range(8, 308):
            logits, _ = model(ids[:, t : t + 1], kv_cache=cache)
            torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.length == 308


def test_a_bf16_model_keeps_a_bf16_cache_that_agrees_with_its_full_forward():
    model = tiny_model(seq_len=64, pos_encoding="rope").to(torch.bfloat16)
    ids = torch.tensor([random_ids(40, seed=3)])
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_kv_cache(batch=1)
        model(ids[:, :8], kv_cache=cache)
        steps = [model(ids[:, t : t + 1], kv_cache=cache)[0][:, 0] for t in range(8, 40)]
    assert cache.keys.dtype == torch.bfloat16
    # Both sides round to bf16 (8 bits of mantissa) along different paths: compare at that precision.
    torch.testing.assert_close(torch.stack(steps, 1).float(), full[:, 8:].float(), rtol=0, atol=0.05)


@pytest.mark.usefixtures("eager_decoding")
def test_ready_for_generation_changes_the_weights_layout_not_the_results(recorded):
    model = tiny_model(seq_len=64, pos_encoding="learned")
    reference = copy.deepcopy(model)
    prompt, cfg = random_ids(5, seed=4), SampleConfig(greedy=True, max_new_tokens=40)
    expected = [row[0] for row in generate_token_ids(reference, [prompt], cfg, pad_id=PAD)]
    recorded.clear()

    ready = ready_for_generation(model)

    assert ready is model and not ready.training
    for (name, tensor), want in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(tensor, want), name  # same shapes and values
    fc = model.blocks[0].mlp.fc
    assert isinstance(fc, MatVecLinear) and fc.layout in LAYOUTS  # a layout chosen by measurement
    assert [row[0] for row in generate_token_ids(model, [prompt], cfg, pad_id=PAD)] == expected
    with torch.no_grad():
        full, _ = reference(torch.tensor([prompt + expected[:-1]]))
    torch.testing.assert_close(torch.stack(recorded, 1), full[:, 4:], rtol=0, atol=1e-5)


def no_cache_reference(model: GPT, prompt: list[int], steps: int, keep: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by full forward passes over the visible context: all of it until it
    outgrows seq_len, then its last `keep` tokens (keep = seq_len: crop to the last seq_len)."""
    context, produced, all_logits = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([context]))[0][0, -1]  # (V,)
            all_logits.append(logits)
            token = int(logits.argmax())
            produced.append(token)
            context.append(token)
            if len(context) > model.config.seq_len:
                context = context[-keep:]
    return produced, all_logits


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
@pytest.mark.parametrize("window_keep", [None, 16, 5])
def test_generation_past_the_context_matches_the_no_cache_reference(pos_encoding, window_keep, recorded):
    model = tiny_model(seq_len=16, pos_encoding=pos_encoding)
    prompt, steps = random_ids(10, seed=2), 40  # crosses the 16-token context several times
    cfg = SampleConfig(greedy=True, max_new_tokens=steps, window_keep=window_keep)
    expected, expected_logits = no_cache_reference(model, prompt, steps, keep=window_keep or 16 // 2)

    produced = [row[0] for row in generate_token_ids(model, [prompt], cfg, pad_id=PAD)]

    assert produced == expected
    assert len(recorded) == steps  # one set of logits a token
    for got, want in zip(recorded, expected_logits):
        torch.testing.assert_close(got[0], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_each_row_of_a_left_padded_batch_equals_its_prompt_run_alone(pos_encoding, recorded):
    model = tiny_model(seq_len=64, pos_encoding=pos_encoding)
    prompts = [random_ids(3, seed=3), random_ids(11, seed=4), random_ids(1, seed=5), random_ids(7, seed=6)]
    cfg = SampleConfig(greedy=True, max_new_tokens=25)

    batch_ids = list(generate_token_ids(model, prompts, cfg, pad_id=PAD))  # 25 x [4 ids]
    batch_logits = torch.stack(recorded)  # (steps, 4, V)

    for row, prompt in enumerate(prompts):
        recorded.clear()
        alone_ids = [step[0] for step in generate_token_ids(model, [prompt], cfg, pad_id=PAD)]
        assert [step[row] for step in batch_ids] == alone_ids
        torch.testing.assert_close(batch_logits[:, row], torch.stack(recorded)[:, 0], rtol=0, atol=1e-5)


def test_the_padding_token_never_changes_the_result(recorded):
    model = tiny_model(seq_len=32, pos_encoding="learned")
    prompts = [random_ids(2, seed=7), random_ids(9, seed=8)]
    cfg = SampleConfig(greedy=True, max_new_tokens=10)
    list(generate_token_ids(model, prompts, cfg, pad_id=PAD))
    with_pad_0 = torch.stack(recorded)
    recorded.clear()
    list(generate_token_ids(model, prompts, cfg, pad_id=VOCAB - 1))
    torch.testing.assert_close(torch.stack(recorded), with_pad_0, rtol=0, atol=1e-6)


def test_a_padded_prefill_never_produces_nan():
    # A padding slot attends only to itself; with nothing to attend to, softmax would give NaN,
    # and NaN values poison every later query even with zero weight.
    model = tiny_model(seq_len=32, pos_encoding="rope")
    cache = model.new_kv_cache(batch=2, pad=torch.tensor([5, 0]))
    with torch.no_grad():
        logits, _ = model(torch.tensor([random_ids(8, seed=9), random_ids(8, seed=10)]), kv_cache=cache)
    assert torch.isfinite(logits).all()
    assert torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all()


def test_bad_prompts_and_windows_are_clear_errors():
    model = tiny_model(seq_len=16, pos_encoding="rope")
    with pytest.raises(GptlabError, match="window_keep"):
        next(generate_token_ids(model, [[1, 2]], SampleConfig(window_keep=17), pad_id=PAD))
    with pytest.raises(GptlabError, match="prompt"):
        next(generate_token_ids(model, [list(range(1, 18))], SampleConfig(), pad_id=PAD))
    with pytest.raises(GptlabError, match="prompt"):
        next(generate_token_ids(model, [[1], []], SampleConfig(), pad_id=PAD))
