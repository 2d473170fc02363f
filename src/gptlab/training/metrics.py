"""How well and how fast a model trains: evaluation loss, bits per byte, exact match, tokens/s and MFU."""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from gptlab.data import TokenDataset, iterate_batches
from gptlab.data.pairs import PairDataset
from gptlab.device import autocast, matmul_seconds, sum_dtype
from gptlab.generation.seq2seq import greedy_decode  # the generation layer, below training
from gptlab.models.fused_loss import IGNORE_INDEX
from gptlab.tokenizers.base import Tokenizer

# Dense tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(): (name, bf16/fp16, fp32). fp32 runs compute their matmuls in TF32
# (configure_backend allows it), half the bf16 rate from Ampere on; V100 and T4 have no TF32.
# More specific names come first ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989e12, 495e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
    ("GH200", 989e12, 495e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L40", 181e12, 90.5e12),
    ("A6000", 155e12, 77.4e12),
    ("A10", 125e12, 62.5e12),
    ("L4", 121e12, 60e12),
    ("4090", 165e12, 82.6e12),
    ("3090", 71e12, 35.6e12),
    ("V100", 125e12, 15.7e12),
    ("T4", 65e12, 8.1e12),
)

# Windows sampled for evaluation are shuffled with this fixed seed: the same spread-out sample
# at every evaluation, so successive losses are comparable.
_EVAL_SEED = 0


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token loss (nats) over `tokens` predicted tokens, and what it means; for
    source/target pairs also the fraction of targets decoded exactly (greedy)."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    exact_match: float | None = None


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Convert a loss in nats per token to bits per byte of text: comparable across tokenizers."""
    return loss / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean loss of `model` on up to `max_batches` batches of `dataset` (all when None).

    The model runs in eval mode (no dropout), under autocast to `dtype` (default: the device's
    usual, see device.autocast), and is put back in the mode it was in. It is called as GPT is in
    training, model(x, y, return_logits=False) -> (_, mean loss): no logits held.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=sum_dtype(device), device=device)  # summed on device: one sync
    total_tokens = 0
    batches = iterate_batches(dataset, batch_size, shuffle=max_batches is not None, seed=_EVAL_SEED, epoch=0)
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)  # (B, T)
        with autocast(device, dtype):
            _, loss = model(x, y, return_logits=False)
        counted = int((y != IGNORE_INDEX).sum())
        total_loss += loss.to(total_loss.dtype) * counted
        total_tokens += counted
    model.train(was_training)
    return _result(total_loss.item(), total_tokens, dataset.bytes_per_token)


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    dataset: PairDataset,
    tokenizer: Tokenizer,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean target-token loss of an encoder-decoder `model` on up to `max_batches` batches of
    pairs (all when None), and the fraction of those targets that greedy decoding gets exactly right.
    """

    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=sum_dtype(device), device=device)
    total_tokens = exact = examples = 0
    batches = iterate_batches(dataset, batch_size, shuffle=max_batches is not None, seed=_EVAL_SEED, epoch=0)
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        with autocast(device, dtype):
            _, loss = model(batch.src, batch.tgt, batch.src_mask, batch.labels)
            decoded = greedy_decode(model, batch.src, batch.src_mask, tokenizer)
        counted = int((batch.labels != IGNORE_INDEX).sum())
        total_loss += loss.to(total_loss.dtype) * counted
        total_tokens += counted
        exact += sum(ids == dataset.reference(j) for ids, j in zip(decoded, batch.indices))
        examples += len(batch.indices)
    model.train(was_training)
    result = _result(total_loss.item(), total_tokens, dataset.bytes_per_token)
    return replace(result, exact_match=exact / examples if examples else float("nan"))


def _result(summed_loss: float, tokens: int, bytes_per_token: float) -> EvalResult:
    if tokens == 0:
        nan = float("nan")
        return EvalResult(loss=nan, perplexity=nan, bits_per_byte=nan, tokens=0)
    mean = summed_loss / tokens
    return EvalResult(
        loss=mean,
        perplexity=math.exp(min(mean, 700.0)),  # exp overflows past ~709
        bits_per_byte=bits_per_byte(mean, bytes_per_token),
        tokens=tokens,
    )


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Data-sheet peak FLOP/s of `device` for matmuls in `dtype` (bf16, fp16 or fp32), or None
    when unknown (CPU, MPS, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    half, single = next(((half, single) for key, half, single in GPU_PEAK_FLOPS if key in name), (None, None))
    return single if dtype == torch.float32 else half


def device_peak_flops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> float | None:
    """The peak that MFU divides by, for a run that computes in `dtype`: `given` (--peak_flops)
    when set, else the data-sheet peak of a known GPU, else on CPU a measured matmul rate in that
    dtype (a bf16 run divided by the float32 peak would report well over 100 %)."""
    if given is not None:
        return given
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return peak_flops(device, dtype)


@functools.cache
def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of the best of a few (n x n) matmuls in `dtype` on the CPU, measured once per
    process and dtype (without moving the RNG: device.matmul_seconds). n doubles from 256 up to
    `size` while a product takes under 50 ms: a dtype this CPU computes slowly (bf16 without
    AVX-512 BF16: 1-2 GFLOP/s) is measured in under a second, not in minutes at 2048."""
    n = min(256, size)
    while True:
        seconds = matmul_seconds(dtype, n, repeats)
        if n >= size or seconds >= 0.05:
            return 2 * n**3 / seconds
        n *= 2


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this run has held: CUDA max allocated on GPUs, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def model_flops_utilization(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Fraction of the device's peak that the training FLOPs use, or None without a known peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_token * tokens_per_s / peak


def format_mfu(mfu: float | None) -> str:
    """'42.0%' or 'n/a'."""
    return "n/a" if mfu is None else f"{100 * mfu:.1f}%"


class Throughput:
    """Tokens per second over the time spent in training steps (evaluation and saving excluded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._started: float | None = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, tokens: int) -> None:
        """End the interval started by start(), during which `tokens` were processed."""
        if self._started is None:
            raise RuntimeError("Throughput.stop() without start()")
        self.seconds += time.perf_counter() - self._started
        self.tokens += tokens
        self._started = None

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        self.tokens, self.seconds = 0, 0.0
