"""Mixed precision and torch.compile, each checked against float32 eager training on a tiny GPT."""

from __future__ import annotations

import pytest
import torch

from gptlab import device
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.device import cpu_bf16_speedup as measure_cpu_bf16_speedup  # the real one: conftest.py patches it
from gptlab.device import resolve_dtype
from gptlab.errors import GptlabError
from gptlab.training import load_checkpoint, precision, train
from gptlab.training.run_files import read_step_log

from helpers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40)))
    return path


def losses(tmp_path, text, name: str, **train_settings) -> list[float]:
    """Per-step training losses of a 4-step run of a tiny GPT."""
    model = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=32, dropout=0.0)
    cfg = TrainConfig(
        max_steps=4,
        learning_rate=3e-3,
        warmup_steps=1,
        eval_interval=100,
        experiment_name=name,
        checkpoint_dir=str(tmp_path / "ckpt"),
        log_dir=str(tmp_path / "runs"),
        device="cpu",
        seed=0,
        **train_settings,
    )
    result = train(model, DatasetConfig(batch_size=8), cfg, ByteTokenizer(), text, progress=False)
    assert result.steps == 4
    return [entry["loss"] for entry in read_step_log(tmp_path / "runs" / name / "metrics.jsonl")]


def test_bf16_autocast_on_cpu_tracks_fp32(tmp_path, text):
    fp32 = losses(tmp_path, text, "fp32", dtype="fp32")
    bf16 = losses(tmp_path, text, "bf16", dtype="bf16")
    assert bf16 != fp32  # it really ran in bfloat16
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=2e-2)
    # Weights stay float32: the checkpoint loads anywhere.
    state = load_checkpoint(tmp_path / "ckpt" / "bf16_e1.pth").model_state
    assert all(t.dtype == torch.float32 for t in state.values())


def test_a_bf16_run_measures_its_mfu_against_the_bf16_peak(tmp_path, text, monkeypatch):
    import gptlab.training.metrics as metrics
    import gptlab.training.reporting as reporting

    peaks = {torch.float32: 4e9, torch.bfloat16: 1e12}  # stand-ins for measure_matmul_flops
    asked = []
    monkeypatch.setattr(metrics, "measure_matmul_flops", lambda dtype: asked.append(dtype) or peaks[dtype])
    monkeypatch.setattr(reporting, "model_flops_utilization", lambda flops, rate, peak: asked.append(peak))
    for dtype in ("bf16", "fp32"):
        losses(tmp_path, text, dtype, dtype=dtype)
    # Each run measured its own dtype's peak and divided by it alone (one process, one device).
    assert asked[0] == torch.bfloat16 and set(asked[1 : asked.index(torch.float32)]) == {1e12}
    assert set(asked[asked.index(torch.float32) + 1 :]) == {4e9}


def test_the_cpu_matmul_peak_is_measured_in_each_dtype():
    from gptlab.training.metrics import measure_matmul_flops

    assert measure_matmul_flops(torch.float32, size=128, repeats=1) > 0
    assert measure_matmul_flops(torch.bfloat16, size=128, repeats=1) > 0


def test_fp16_on_cpu_is_a_clear_error(tmp_path, text):
    with pytest.raises(GptlabError, match="--dtype fp16 needs a CUDA GPU"):
        losses(tmp_path, text, "fp16", dtype="fp16")


@pytest.mark.parametrize("speedup, expected", [(0.02, torch.float32), (1.6, torch.bfloat16)])
def test_auto_dtype_on_cpu_is_bf16_only_where_it_is_measured_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == expected
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp32", cpu) == torch.float32
    assert device.usual_dtype(cpu) == torch.float32  # evaluation's default never depends on timing
    auto = precision.Precision("auto", cpu)
    assert auto.dtype == expected and auto.notice.startswith(f"--dtype auto: {auto.name} (")
    slow_bf16 = precision.Precision("bf16", cpu).notice
    assert (slow_bf16 is not None and "--dtype auto or fp32 trains faster" in slow_bf16) == (speedup < 1)
    assert precision.Precision("fp32", cpu).notice is None


@pytest.mark.parametrize(
    "speedup, resumed, kept",
    [
        (1.1, None, True),  # a fresh run: as measured
        (0.9, None, False),
        (0.9, True, True),  # a resumed run near the line: as it trained, whatever this measurement says
        (1.5, False, False),
        (0.02, True, False),  # emulated bf16 here (no AVX-512 BF16): measured, or the run would crawl
    ],
)
def test_a_resumed_run_keeps_its_bf16_decision_unless_this_cpu_emulates_bf16(monkeypatch, speedup, resumed, kept):
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert precision.kept_bf16_decision(cpu, resumed) is kept
    auto = precision.Precision("auto", cpu, resumed)
    assert auto.bf16_fast is kept and auto.dtype == (torch.bfloat16 if kept else torch.float32)
    assert auto.notice.endswith("(its checkpoint says)") == (resumed is not None and resumed == kept)
    assert precision.kept_bf16_decision(torch.device("cuda"), True) is None  # decided by the GPU, not recorded


def test_cpu_bf16_speedup_is_measured_without_moving_the_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert measure_cpu_bf16_speedup(size=32, repeats=1) > 0
    assert torch.equal(torch.rand(3), expected)


def test_compiled_model_matches_eager(tmp_path, text):
    # ~15 s on 2 CPU cores: inductor compiles C++ kernels for the forward and the backward.
    eager = losses(tmp_path, text, "eager")
    compiled = losses(tmp_path, text, "compiled", compile=True)
    for a, b in zip(eager, compiled):
        assert b == pytest.approx(a, abs=1e-5, rel=1e-5)
    # The checkpoint of a compiled run holds the plain model's weight names.
    state = load_checkpoint(tmp_path / "ckpt" / "compiled_e1.pth").model_state
    assert not any("_orig_mod" in key for key in state)


def test_a_compiled_cpu_run_measures_its_attention_before_tracing(tmp_path, text, monkeypatch):
    # A traced step cannot time anything: the trainer measures the step's attention shape first.
    import gptlab.training.compiling as compiling

    events = []
    monkeypatch.setattr(compiling, "choose_attention", lambda shape, dtype: events.append(("measure", shape, dtype)))
    monkeypatch.setattr(compiling.torch, "compile", lambda model: events.append(("compile",)) or model)
    monkeypatch.setattr(compiling, "cpu_compiler", lambda: "g++")
    losses(tmp_path, text, "compiled_bf16", compile=True, dtype="bf16")
    # batch 8, 2 heads, 32 tokens, head size 16, in the autocast dtype; then compiled
    assert events == [("measure", (8, 2, 32, 16), torch.bfloat16), ("compile",)]


def test_compile_without_a_cpu_compiler_trains_eagerly_and_says_so(tmp_path, text, monkeypatch, capsys):
    import gptlab.training.compiling as compiling

    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    monkeypatch.setattr(compiling.torch, "compile", lambda model: pytest.fail("compiled without a compiler"))
    assert losses(tmp_path, text, "no_cxx", compile=True) == losses(tmp_path, text, "eager_again")
    assert "--compile: no C++ compiler found" in capsys.readouterr().out


# ---- fp16 loss scaling: its CUDA-only dtype checks set aside, the GradScaler logic runs on CPU ----
@pytest.fixture
def fp16_scaling_on_cpu(monkeypatch):
    """Precision("fp16") on CPU with a real GradScaler, computing in float32 (no fp16 autocast):
    the scaling, unscaling, skipping and checkpointing of fp16 training, without a GPU."""
    import contextlib

    monkeypatch.setattr(precision, "resolve_dtype", lambda name, device, bf16_fast=None: torch.float16)
    monkeypatch.setattr(precision, "autocast", lambda device, dtype: contextlib.nullcontext())
    return precision.Precision


def test_loss_scaling_leaves_the_training_curve_unchanged(tmp_path, text, fp16_scaling_on_cpu):
    # Scaling by a power of two and unscaling before clipping and the update is exact in float32.
    assert losses(tmp_path, text, "scaled", dtype="fp16") == losses(tmp_path, text, "plain")
    saved = load_checkpoint(tmp_path / "ckpt" / "scaled_e1.pth")
    assert saved.extra["grad_scaler"]["scale"] == 2.0**16  # no overflow in 4 steps, no growth before 2000


def test_a_step_with_overflowing_gradients_is_skipped_and_the_scale_halved(fp16_scaling_on_cpu):
    from gptlab.training.optim import OptimizerSet

    precision = fp16_scaling_on_cpu("fp16", torch.device("cpu"))
    layer = torch.nn.Linear(3, 1)
    optimizer = OptimizerSet({"adamw": torch.optim.AdamW(layer.parameters(), lr=0.1)})
    before = layer.weight.detach().clone()

    precision.backward(layer.weight.sum() * 1e34)  # finite loss; times the 2**16 scale, inf gradients
    precision.unscale(optimizer)
    precision.step(optimizer)
    assert torch.equal(layer.weight, before) and precision.scaler.get_scale() == 2.0**15
    assert precision.skips_bad_steps

    optimizer.zero_grad()
    precision.backward(layer.weight.sum() * 2.0)
    precision.unscale(optimizer)
    torch.testing.assert_close(layer.weight.grad, torch.full((1, 3), 2.0))  # the true gradient again
    precision.step(optimizer)
    assert not torch.equal(layer.weight, before)

    resumed = fp16_scaling_on_cpu("fp16", torch.device("cpu"))
    resumed.load_state_dict(precision.state_dict())
    assert resumed.scaler.get_scale() == precision.scaler.get_scale() == 2.0**15
