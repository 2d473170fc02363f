"""DecodeStep computes what GPT.forward computes for one token a row after a KV cache, for every
model variant and kind of linear layer, in fewer operations."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptlab.errors import GptlabError
from gptlab.generation import ready_for_generation
from gptlab.models import GPT
from gptlab.models.decode_step import DecodeStep
from gptlab.models.lora import apply_lora
from gptlab.models.matvec import MatVecLinear

from helpers import DECODE_VARIANTS, DECODE_VOCAB, perturbed_gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def steps_both_ways(model: GPT, prompts: torch.Tensor, steps: int, pad: torch.Tensor | None = None):
    """Prefill `prompts` (B, T) into two caches, then feed the same random tokens one at a time
    through GPT.forward and through a DecodeStep; the logits (steps, B, V) of each, and the caches."""
    B = prompts.size(0)
    caches = [model.new_kv_cache(B, pad=pad) for _ in range(2)]
    decode = DecodeStep(model)
    tokens = torch.randint(1, DECODE_VOCAB, (steps, B), generator=torch.Generator().manual_seed(5))
    forward_logits, step_logits = [], []
    with torch.inference_mode():
        for cache in caches:
            model(prompts, kv_cache=cache)
        for ids in tokens:
            forward_logits.append(model(ids[:, None], kv_cache=caches[0], last_only=True)[0][:, -1])
            step_logits.append(decode(ids, caches[1]))
    return torch.stack(forward_logits), torch.stack(step_logits), caches


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_the_step_equals_the_forward_pass_for_every_variant(variant):
    model = perturbed_gpt(**DECODE_VARIANTS[variant])
    prompts = torch.randint(1, DECODE_VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))

    want, got, (forward_cache, step_cache) = steps_both_ways(model, prompts, steps=30)

    assert got.shape == (30, 3, DECODE_VOCAB)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert step_cache.length == forward_cache.length == 36
    torch.testing.assert_close(step_cache.keys, forward_cache.keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(step_cache.values, forward_cache.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "cpu-10min", "qk-norm, rope"])
def test_left_padded_rows_get_their_own_positions_and_mask(variant):
    model = perturbed_gpt(**DECODE_VARIANTS[variant])
    prompts = torch.randint(1, DECODE_VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    pad = torch.tensor([0, 4, 6])  # rows of 7, 3 and 1 real tokens

    want, got, _ = steps_both_ways(model, prompts, steps=20, pad=pad)

    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("eager_decoding")
@pytest.mark.parametrize("layout", ["plain", "transposed", "plain_split", "transposed_split"])
def test_every_layout_of_a_model_ready_for_generation_gives_the_same_logits(layout):
    model = ready_for_generation(perturbed_gpt(**DECODE_VARIANTS["gpt2"]))
    for module in model.modules():
        if isinstance(module, MatVecLinear):
            module.set_layout(layout, splits=2)
    prompts = torch.randint(1, DECODE_VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))

    want, got, _ = steps_both_ways(model, prompts, steps=10)

    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_int8_and_lora_layers_compute_their_own_products():
    int8 = ready_for_generation(perturbed_gpt(**DECODE_VARIANTS["cpu-10min"]), torch.qint8)
    adapted = perturbed_gpt(**DECODE_VARIANTS["gpt2"])
    apply_lora(adapted, rank=4, alpha=8, targets="both")
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)  # a trained update, not the zero it starts at
    adapted.eval()
    prompts = torch.randint(1, DECODE_VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))

    for model in (int8, adapted):
        want, got, _ = steps_both_ways(model, prompts, steps=10)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", DECODE_VARIANTS)
def test_the_step_runs_fewer_operations_than_the_forward_pass(variant):
    model = perturbed_gpt(**DECODE_VARIANTS[variant])
    ids = torch.tensor([3])
    counts = []
    decode = DecodeStep(model)
    for run in (lambda cache: model(ids[:, None], kv_cache=cache, last_only=True), lambda cache: decode(ids, cache)):
        cache = model.new_kv_cache(1)
        with torch.inference_mode(), CountOps() as ops:
            run(cache)
        counts.append(ops.count)
    forward_ops, step_ops = counts
    assert step_ops <= 0.75 * forward_ops, counts


def test_a_model_in_training_mode_or_a_full_cache_is_refused():
    model = perturbed_gpt(**DECODE_VARIANTS["gpt2"])
    with pytest.raises(ValueError, match="eval mode"):
        DecodeStep(model.train())
    model.eval()
    cache = model.new_kv_cache(1)
    cache.length = model.config.seq_len
    with pytest.raises(GptlabError, match="seq_len=40"):
        DecodeStep(model)(torch.tensor([1]), cache)
