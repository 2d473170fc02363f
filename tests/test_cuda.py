"""The CUDA paths, on a machine with an NVIDIA GPU: the model, the fused loss, attention and the
decode step against their references there, and `gptlab train|generate|eval` end to end in bf16,
fp16 and compiled, with a resumed run against an uninterrupted one. Skipped where no GPU is seen:
`make test-cuda` runs them (CI's machines have none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gptlab.cli import main
from gptlab.generation import ready_for_generation
from gptlab.models.attention_choice import causal_attention, explicit_causal_attention
from gptlab.models.decode_step import DecodeStep
from gptlab.models.fused_loss import IGNORE_INDEX, linear_cross_entropy
from gptlab.training.run_files import find_latest, read_step_log

from data_files import write_toy_texts
from helpers import random_gpt

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
CUDA = torch.device("cuda")
VOCAB = 96
# Every option of the GPT the presets train, the GPT-only extras included.
CPU_10MIN_LIKE = dict(
    pos_encoding="rope", norm="rmsnorm", activation="relu2", qk_norm=True, value_embeddings=1, logit_softcap=15.0,
    unet_skips=True, smear=True,
)  # fmt: skip


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """`gptlab train` allows TF32 (10-bit mantissas) for float32 matmuls; the float32 comparisons
    here want full float32, whatever a test before them set."""
    allowed = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = allowed


def random_ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_a_gpt_computes_on_the_gpu_what_it_computes_on_the_cpu():
    model = random_gpt(VOCAB, **CPU_10MIN_LIKE)
    ids, targets = random_ids(3, 40), random_ids(3, 40, seed=2)
    want_logits, want_loss = model(ids, targets)

    model.to(CUDA)
    got_logits, got_loss = model(ids.to(CUDA), targets.to(CUDA))
    torch.testing.assert_close(got_loss.cpu(), want_loss, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", torch.bfloat16):
        bf16_logits, bf16_loss = model(ids.to(CUDA))
    assert bf16_loss is None and bf16_logits.shape[-1] == VOCAB
    # bf16 keeps 8 bits of mantissa: the same predictions, to about a percent of the logits' spread.
    spread = want_logits.std().item()
    assert (bf16_logits.float().cpu() - want_logits).abs().max() < 0.1 * spread
    assert (got_logits.cpu() - want_logits).abs().max() < 1e-4 * spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_loss_on_the_gpu_equals_the_plain_head_and_loss(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=generator).to(CUDA, dtype)
    weight = torch.randn(VOCAB, 64, generator=generator).to(CUDA, dtype)
    targets = torch.randint(0, VOCAB, (300,), generator=generator).to(CUDA)
    targets[::7] = IGNORE_INDEX

    def loss_and_grads(loss_fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = loss_fn(h, w)
        loss.backward()
        return loss.float(), h.grad.float(), w.grad.float()

    want = loss_and_grads(lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=IGNORE_INDEX))
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, targets, 128, softcap=None))
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tolerance)


def test_the_fused_attention_on_the_gpu_equals_the_explicit_one():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, generator=generator).to(CUDA, torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v), explicit_causal_attention(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_step_on_the_gpu_equals_the_full_forward(dtype):
    model = ready_for_generation(random_gpt(VOCAB, **CPU_10MIN_LIKE).to(CUDA), dtype)
    prompts = random_ids(3, 6).to(CUDA)
    tokens = random_ids(20, 3, seed=5).to(CUDA)
    caches = [model.new_kv_cache(3) for _ in range(2)]
    decode = DecodeStep(model)
    with torch.inference_mode():
        for cache in caches:
            model(prompts, kv_cache=cache)
        for ids in tokens:
            want = model(ids[:, None], kv_cache=caches[0], last_only=True)[0][:, -1]
            got = decode(ids, caches[1])
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_toy_texts(tmp_path_factory.mktemp("cuda"))


def train_args(tmp: Path, run: str, *extra: str) -> list[str]:
    """A small GPT with RoPE and QK-norm, trained with Muon on the GPU."""
    return [
        "train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp / "train.txt"),
        "--eval_data", str(tmp / "eval.txt"), "--device", "cuda", "--embed_dim", "64", "--num_layers", "2",
        "--n_heads", "2", "--seq_len", "32", "--batch_size", "16", "--qk_norm", "--pos_encoding", "rope",
        "--optimizer", "muon", "--max_steps", "60", "--eval_interval", "30", "--eval_batches", "2",
        "--experiment_name", "exp", "--checkpoint_dir", str(tmp / run), "--log_dir", str(tmp / run / "runs"),
        "--no_progress", *extra,
    ]  # fmt: skip


def losses(tmp: Path, run: str) -> list[float]:
    return [entry["loss"] for entry in read_step_log(tmp / run / "runs" / "exp" / "metrics.jsonl")]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def fp32_curve(workdir) -> list[float]:
    assert main(train_args(workdir, "fp32", "--dtype", "fp32")) == 0
    return losses(workdir, "fp32")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_on_the_gpu_in_half_precision_learns_as_fp32_does(workdir, fp32_curve, dtype, capsys):
    assert main(train_args(workdir, dtype, "--dtype", dtype)) == 0
    out = capsys.readouterr().out
    curve = losses(workdir, dtype)
    assert len(curve) == len(fp32_curve) == 60 and all(loss == loss for loss in curve)  # no NaN
    for run in (curve, fp32_curve):  # measured on an H200: 5.95 -> 5.60 nats in each dtype
        assert mean(run[-10:]) < mean(run[:10]) - 0.2
    assert mean(curve[-10:]) == pytest.approx(mean(fp32_curve[-10:]), abs=0.05)
    if any(name in torch.cuda.get_device_name() for name in ("H100", "H200")):
        assert "MFU n/a" not in out  # a known GPU: MFU against its data-sheet peak


def test_a_compiled_run_on_the_gpu_follows_the_eager_one(workdir, capsys):
    assert main(train_args(workdir, "eager", "--dtype", "bf16", "--max_steps", "20")) == 0
    assert main(train_args(workdir, "compiled", "--dtype", "bf16", "--max_steps", "20", "--compile")) == 0
    assert "eagerly" not in capsys.readouterr().out  # it compiled
    eager, compiled = losses(workdir, "eager"), losses(workdir, "compiled")
    assert eager[0] == pytest.approx(compiled[0], abs=1e-2)  # the same start, other kernels' rounding
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 0.1


def test_a_resumed_run_on_the_gpu_follows_the_uninterrupted_one(workdir):
    # A constant rate, so that stopping early leaves the schedule as it was.
    flags = ("--dtype", "bf16", "--warmup_steps", "0", "--min_lr_ratio", "1", "--save_every_steps", "10")
    assert main(train_args(workdir, "whole", *flags, "--max_steps", "50")) == 0
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "30")) == 0
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "50", "--resume", "auto")) == 0
    whole, parts = losses(workdir, "whole"), losses(workdir, "parts")
    assert len(parts) == len(whole) == 50
    # GPU kernels that add in parallel (the embedding's backward) may round in another order.
    assert max(abs(a - b) for a, b in zip(whole, parts)) < 1e-2


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    """The final checkpoint of a bf16 run on the GPU."""
    assert main(train_args(workdir, "checkpoint", "--dtype", "bf16", "--max_steps", "30")) == 0
    return find_latest(workdir / "checkpoint", "exp")


def test_a_checkpoint_trained_on_the_gpu_generates_and_evaluates_there_and_on_the_cpu(checkpoint, workdir, capsys):
    texts = []
    for device in ("cuda", "cuda", "cpu"):
        capsys.readouterr()
        generate = ["generate", "--model_path", str(checkpoint), "--prompt", "The", "--length", "20"]
        assert main([*generate, "--seed", "3", "--device", device]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()  # seeded sampling on the GPU repeats
    assert texts[2].strip()
    bits = {}
    for device in ("cuda", "cpu"):
        capsys.readouterr()
        assert (
            main(["eval", "--model_path", str(checkpoint), "--data", str(workdir / "eval.txt"), "--device", device])
            == 0
        )
        words = capsys.readouterr().out.split()
        bits[device] = float(words[words.index("bits/byte") + 1])
    assert bits["cuda"] == pytest.approx(bits["cpu"], abs=2e-2)  # bf16 on the GPU, float32 on the CPU


def test_int8_on_the_gpu_is_refused_in_one_line(checkpoint, capsys):
    code = main(["generate", "--model_path", str(checkpoint), "--prompt", "The", "--dtype", "int8", "--device", "cuda"])
    assert code != 0
    err = capsys.readouterr().err
    assert "CPUs only" in err and err.count("\n") == 1
