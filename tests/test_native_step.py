"""The decoding step in C computes what GPT.forward computes for one token after a KV cache, for
every model variant it takes, in either weight layout and on one or two threads; it hands every
other case to DecodeStep, and without a compiler nothing changes."""

import ctypes

import pytest
import torch
from torch import nn

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation import generate_token_ids, ready_for_generation
from gptlab.models import native_layout, native_step
from gptlab.models.decode_step import DecodeStep
from gptlab.models.int8 import Int8Linear, int8_supported, use_int8_linears
from gptlab.models.lora import apply_lora
from gptlab.models.matvec import MatVecLinear, use_matvec_linears
from gptlab.models.native_layout import choose_memory_orders
from gptlab.models.native_step import NativeDecodeStep, decode_step, native_library, unsupported

from helpers import DECODE_VARIANTS, DECODE_VOCAB, perturbed_gpt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

NATIVE = [name for name in DECODE_VARIANTS if unsupported(perturbed_gpt(**DECODE_VARIANTS[name])) is None]
OTHERS = [name for name in DECODE_VARIANTS if name not in NATIVE]
needs_int8 = pytest.mark.skipif(not int8_supported(), reason="this torch has no fbgemm kernels")


@pytest.fixture(scope="module")
def library():
    built = native_library()
    if built is None:
        pytest.skip("no C compiler here: the native step is not built")
    return built


def native_against_forward(model, steps: int = 12, prompt_len: int = 5) -> None:
    """Feed the same tokens through GPT.forward and through a NativeDecodeStep after the same
    prompt; the logits and the caches must agree."""
    ids = torch.randint(1, DECODE_VOCAB, (steps + prompt_len,), generator=torch.Generator().manual_seed(3))
    caches = [model.new_kv_cache(1) for _ in range(2)]
    step = decode_step(model)
    assert isinstance(step, NativeDecodeStep)
    with torch.inference_mode():
        for cache in caches:
            model(ids[None, :prompt_len], kv_cache=cache)
        for token in ids[prompt_len:]:
            expected = model(token.view(1, 1), kv_cache=caches[0], last_only=True)[0][:, -1]
            torch.testing.assert_close(step(token.view(1), caches[1]), expected, rtol=1e-5, atol=1e-5)
    assert caches[0].length == caches[1].length
    torch.testing.assert_close(caches[1].keys, caches[0].keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].values, caches[0].values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", NATIVE)
def test_the_native_step_equals_the_forward_pass(library, variant):
    native_against_forward(perturbed_gpt(**DECODE_VARIANTS[variant]))


@pytest.mark.parametrize("layout", ["plain", "transposed"])
def test_either_memory_order_of_the_weights_gives_the_same_logits(library, layout):
    """MatVecLinear's layouts keep the weights (out, in) or (in, out) in memory; the tied table too."""
    model = perturbed_gpt(**DECODE_VARIANTS["gpt2"])
    use_matvec_linears(model)
    for module in model.modules():
        if isinstance(module, MatVecLinear):
            module.set_layout(layout, 1)
    assert model.wte.weight.is_contiguous() == (layout == "plain")  # the head shares the table
    native_against_forward(model)


def test_two_threads_share_the_large_products(library):
    """Products over PARALLEL_MIN_WEIGHTS weights, and attention once a layer's cache holds
    PARALLEL_MIN_ATTENTION values, are split across threads: same logits."""
    model = perturbed_gpt(embed_dim=128, **DECODE_VARIANTS["cpu-10min"])  # fc: 128 x 512 weights
    torch.set_num_threads(2)
    try:
        native_against_forward(model, steps=30)  # slots up to 34: 4 heads x 35 slots x 32 > 4,096 values
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("variant", OTHERS)
def test_models_it_does_not_take_decode_with_decode_step(library, variant):
    model = perturbed_gpt(**DECODE_VARIANTS[variant])
    assert unsupported(model) is not None
    assert type(decode_step(model)) is DecodeStep
    with pytest.raises(ValueError, match="does not take this model"):
        NativeDecodeStep(model, library)


def test_lora_layers_and_training_mode_are_left_to_decode_step(library):
    model = perturbed_gpt(**DECODE_VARIANTS["gpt2"])
    assert "training mode" in unsupported(model.train())
    apply_lora(model.eval(), rank=2, alpha=4, targets="both")
    assert "LoRA" in unsupported(model)


@needs_int8
@pytest.mark.parametrize("variant", NATIVE)
def test_int8_weights_decode_natively_as_the_int8_forward_pass(library, variant):
    """Int8Linear's products (fbgemm) in the prompt and the forward pass, native_step.c's in the
    steps: the same integer sums, so the same logits up to float rounding. (On these small models
    no input lands within float rounding of a 7-bit rounding boundary, where the two may round it
    apart: see models/int8.py. The test below puts inputs on those boundaries, product by product.)"""
    model = perturbed_gpt(**DECODE_VARIANTS[variant])
    use_int8_linears(model)
    native_against_forward(model)


@needs_int8
def test_int8_products_on_two_threads(library):
    model = perturbed_gpt(embed_dim=256, **DECODE_VARIANTS["llama-like"])  # fc: 256 x 1024 > PARALLEL_MIN_INT8_WEIGHTS
    use_int8_linears(model)
    torch.set_num_threads(2)
    try:
        native_against_forward(model, steps=4)
    finally:
        torch.set_num_threads(1)


def near_ties(n: int, generator: torch.Generator) -> torch.Tensor:
    """n inputs whose quantized values (x / max|x| in steps of 2/127, plus 64) fall on or within
    two floats of a tie between two integers, where a rounding rule shows; the largest is +-1."""
    halves = torch.randint(-64, 64, (n,), generator=generator).double() + 0.5
    x = (halves * 2 / 127).float()
    for _ in range(2):  # nudge each value by up to two floats either way
        nudge = torch.randint(-1, 2, (n,), generator=generator)
        x = torch.where(nudge != 0, torch.nextafter(x, nudge.float() * 2), x)
    x[torch.randint(0, n, (1,), generator=generator)] = 1.0
    return x


@needs_int8
@pytest.mark.parametrize("n_in", [64, 67, 130])  # a whole vector width, and tails after it
def test_int8_products_quantize_their_inputs_as_fbgemm_does(library, n_in):
    """One rounding of an input differently would move its output by about 1e-2 of a term; float
    rounding moves it by 1e-6. Outputs not in fours and biases included."""
    generator = torch.Generator().manual_seed(n_in)
    for n_out, bias in [(5, True), (64, False), (130, True)]:
        torch.manual_seed(n_out)
        linear = Int8Linear(nn.Linear(n_in, n_out, bias=bias))
        matrix, quantized = native_step._matrix(linear), torch.empty(n_in, dtype=torch.uint8)
        for scale in (0.25, 3.0, -1.0):  # exact ties (a power of two), and rounded divisions
            x = near_ties(n_in, generator) * scale
            got = torch.empty(n_out)
            library.gptlab_product(ctypes.byref(matrix), x.data_ptr(), got.data_ptr(), quantized.data_ptr(), 1)
            torch.testing.assert_close(got, linear(x[None])[0], rtol=1e-5, atol=1e-5)


def test_a_batch_and_padded_rows_go_to_decode_step(library):
    model = perturbed_gpt(**DECODE_VARIANTS["cpu-10min"])
    step = decode_step(model)
    pad = torch.tensor([0, 2])
    prompts = torch.randint(1, DECODE_VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    caches = [model.new_kv_cache(2, pad=pad) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            model(prompts, kv_cache=cache)
        torch.testing.assert_close(step(prompts[:, -1], caches[0]), DecodeStep(model)(prompts[:, -1], caches[1]))


def test_a_full_context_is_refused_in_one_line(library):
    model = perturbed_gpt(**DECODE_VARIANTS["cpu-10min"])
    cache = model.new_kv_cache(1)
    cache.length = model.config.seq_len
    with pytest.raises(GptlabError, match="seq_len=40"):
        decode_step(model)(torch.tensor([1]), cache)


def test_the_greedy_choice_is_the_largest_logit_not_banned(library):
    model = perturbed_gpt(**DECODE_VARIANTS["llama-like"])
    step, caches = decode_step(model), [model.new_kv_cache(1) for _ in range(3)]
    ids = torch.randint(1, DECODE_VOCAB, (12,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        logits = torch.cat([step(token, caches[0]) for token in ids.view(-1, 1)])  # (12, V)
        banned = torch.zeros(DECODE_VOCAB, dtype=torch.bool)
        banned[logits.argmax(dim=-1)] = True  # every step's first choice: the second must be found
        for token, row in zip(ids.view(-1, 1), logits):
            assert step.greedy(token, caches[1]).item() == row.argmax().item()
            chosen = step.greedy(token, caches[2], banned).item()
            assert chosen == row.masked_fill(banned, float("-inf")).argmax().item() and not banned[chosen]
    batches = [model.new_kv_cache(2, pad=torch.tensor([0, 2])) for _ in range(2)]  # one row padded: DecodeStep
    with torch.inference_mode():
        for batch in batches:
            model(ids[None, :4].expand(2, 4), kv_cache=batch)
        want = DecodeStep(model)(ids[4:6], batches[0]).masked_fill(banned, float("-inf")).max(dim=-1).indices
        assert step.greedy(ids[4:6], batches[1], banned).tolist() == want.tolist()


def test_generation_gives_the_same_tokens_with_and_without_it(library, monkeypatch):
    """ready_for_generation keeps nn.Linear's weights for the native step, and measures layouts
    without it. Greedy, with banned ids, past the context (a window restart after 40 tokens)."""
    cfg = SampleConfig(max_new_tokens=60, temperature=0.0)

    def tokens(banned=None):
        model = ready_for_generation(perturbed_gpt(**DECODE_VARIANTS["cpu-10min"]))
        linears = [type(m) for m in model.modules() if isinstance(m, nn.Linear)]
        return [ids[0] for ids in generate_token_ids(model, [[1, 2, 3]], cfg, pad_id=0, banned=banned)], linears

    banned = torch.zeros(DECODE_VOCAB, dtype=torch.bool)
    banned[tokens()[0][:3]] = True  # the first choices: banned, the text must change
    native, native_linears = tokens(banned)
    assert not banned[native].any()
    monkeypatch.setattr(native_step, "native_library", lambda: None)
    eager, eager_linears = tokens(banned)
    assert eager == native
    assert set(native_linears) == {nn.Linear} and set(eager_linears) == {MatVecLinear}


def test_without_a_working_compiler_there_is_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native_library.cache_clear()
    try:
        assert native_library() is None
        assert type(decode_step(perturbed_gpt(**DECODE_VARIANTS["gpt2"]))) is DecodeStep
        assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv("GPTLAB_NATIVE", "0")
        native_library.cache_clear()
        assert native_library() is None
    finally:
        native_library.cache_clear()


def test_memory_orders_chosen_by_measurement_keep_the_results(library):
    model = perturbed_gpt(**DECODE_VARIANTS["gpt2"])
    ids = torch.randint(1, DECODE_VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)[0]
        orders = choose_memory_orders(model, max_total_s=60)
        after = model(ids)[0]
    assert set(orders.values()) <= {"(out, in)", "(in, out)"}
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    native_against_forward(model)


def test_a_shape_is_flipped_only_when_whole_steps_get_faster(library, monkeypatch):
    """Steps are "faster" exactly when the MLP's first matrix is stored (in, out): only it flips."""
    model = perturbed_gpt(**DECODE_VARIANTS["cpu-10min"])
    fc = model.blocks[0].mlp.fc

    def seconds(model, steps=native_layout.STEPS, rounds=native_layout.ROUNDS):
        return 0.001 if fc.weight.is_contiguous() else 0.0005

    monkeypatch.setattr(native_layout, "seconds_per_step", seconds)
    orders = choose_memory_orders(model)
    assert orders.pop((fc.in_features, fc.out_features)) == "(in, out)"
    assert set(orders.values()) == {"(out, in)"}
    assert all(not block.mlp.fc.weight.is_contiguous() for block in model.blocks)  # every matrix of that shape


def test_a_model_too_slow_to_time_keeps_its_weights(library, monkeypatch):
    model = perturbed_gpt(**DECODE_VARIANTS["cpu-10min"])
    monkeypatch.setattr(native_layout, "seconds_per_step", lambda *a, **k: native_layout.MAX_STEP_S * 2)
    assert set(choose_memory_orders(model).values()) == {"(out, in)"}
