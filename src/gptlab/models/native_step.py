"""A decoding step in C: one call a token instead of some 20 PyTorch operations a layer.

DecodeStep (decode_step.py) is as few operations as PyTorch allows, but on a small model each one's
dispatch costs about as much as the arithmetic: at 4 x 128 the products that read the weights were
0.4 of a step's time. native_step.c computes the same step, for one row, with loops over the
model's own parameters and KV cache (no copies: pointers to their memory), so that little is left
besides the products. It is built with the machine's C compiler the first time it is needed
(about a second; -O3 -march=native, OpenMP where the compiler has it) into ~/.cache/gptlab/native/
($XDG_CACHE_HOME when set) and loaded with ctypes. Without a compiler, or with GPTLAB_NATIVE=0,
nothing changes: `native_library()` returns None and DecodeStep decodes.

NativeDecodeStep takes the models DecodeStep takes in their common form: float32 on a CPU, plain
or MatVecLinear products in either memory order or Int8Linear's int8 weights (`--dtype int8`,
quantized exactly as fbgemm quantizes them for Int8Linear, with integer sums on AVX-512 VNNI or
AVX2), LayerNorm or RMSNorm, GELU, ReLU² or SwiGLU, learned, sinusoidal or rotary positions,
QK-norm, a soft cap. It computes one unpadded row; any other call (a batch, left-padded rows) goes
to the DecodeStep it holds. Its logits equal DecodeStep's up to float rounding
(tests/test_native_step.py; in int8, while every input rounds to the same 7 bits: models/int8.py).
For greedy decoding it also picks the token (NativeDecodeStep.greedy).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import nn

from gptlab.models.blocks import LearnedPositions, SinusoidalPositions
from gptlab.models.decode_step import DecodeStep
from gptlab.models.gpt import GPT
from gptlab.models.int8 import Int8Linear
from gptlab.models.kv_cache import KVCache
from gptlab.models.matvec import MatVecLinear

SOURCE = Path(__file__).with_name("native_step.c")
ACTIVATIONS = {"gelu": 0, "relu2": 1, "swiglu": 2}  # native_step.c's ACT_* values


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("n_in", ctypes.c_int64),
        ("n_out", ctypes.c_int64),
        ("in_major", ctypes.c_int64),
        ("qweight", ctypes.c_void_p),
        ("multipliers", ctypes.c_void_p),
        ("qweight_sums", ctypes.c_void_p),
    ]


class _Norm(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("rms", ctypes.c_int32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("norm_1", _Norm),
        ("norm_2", _Norm),
        ("qkv", _Matrix),
        ("proj", _Matrix),
        ("fc", _Matrix),
        ("mlp_proj", _Matrix),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n_layers", "dim", "n_heads", "head_dim", "max_len", "threads")),
        ("activation", ctypes.c_int64),
        ("qk_norm_eps", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("embeddings", ctypes.c_void_p),
        ("embed_row", ctypes.c_int64),
        ("embed_col", ctypes.c_int64),
        ("norm_f", _Norm),
        ("head", _Matrix),
        ("layers", ctypes.POINTER(_Layer)),
        *((name, ctypes.c_void_p) for name in ("x", "x_norm", "y", "qkv", "h", "scores", "xq")),
    ]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _matrix(linear: nn.Module) -> _Matrix:
    shape = linear.in_features, linear.out_features
    if isinstance(linear, Int8Linear):  # its int8 copy of the weights, always (out, in)
        int8 = (_pointer(t) for t in (linear.qweight, linear.multipliers, linear.qweight_sums))
        return _Matrix(None, _pointer(linear.bias), *shape, 0, *int8)
    w = linear.weight  # (out, in), stored either way round (unsupported() checked that it is one of the two)
    return _Matrix(w.data_ptr(), _pointer(linear.bias), *shape, int(not w.is_contiguous()))


def _norm(norm: nn.Module) -> _Norm:
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    return _Norm(_pointer(norm.weight), _pointer(getattr(norm, "bias", None)), eps, int(type(norm) is nn.RMSNorm))


def step_linears(model: GPT) -> list[nn.Module]:
    """The linear layers a decoding step reads: each block's q|k|v, projection and MLP's two, then the head."""
    blocks = model.blocks
    return [*(m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)), model.lm_head]


def _rows(table: torch.Tensor | None) -> tuple[int, int, torch.Tensor] | None:
    """(address, bytes a row, the tensor kept alive) of a (positions, ·) table, made contiguous:
    a position's row is then found by arithmetic."""
    if table is None:
        return None
    table = table.contiguous()
    return table.data_ptr(), table.stride(0) * table.element_size(), table


def unsupported(model: nn.Module) -> str | None:
    """Why NativeDecodeStep cannot compute `model`'s steps, or None when it can."""
    if not isinstance(model, GPT):
        return "not a GPT"
    if model.training:
        return "in training mode (dropout)"
    config = model.config
    if model.smear_gate is not None or model.skip_weights is not None or len(model.value_embeds):
        return "the smear, U-net skips and value embeddings are computed by DecodeStep only"
    if config.activation not in ACTIVATIONS:
        return f"activation {config.activation}"
    for linear in step_linears(model):
        if type(linear) not in (nn.Linear, MatVecLinear, Int8Linear):
            return f"{type(linear).__name__} layers (LoRA) are computed by DecodeStep only"
        if type(linear) is not Int8Linear and not (linear.weight.is_contiguous() or linear.weight.t().is_contiguous()):
            return "a weight stored neither (out, in) nor (in, out)"
    for param in [*model.parameters(), *model.buffers()]:
        if param.device.type != "cpu" or param.dtype != torch.float32:
            return "float32 on a CPU only"
    norms = [model.norm_f, *(n for block in model.blocks for n in (block.norm_1, block.norm_2))]
    if any(type(n) not in (nn.LayerNorm, nn.RMSNorm) for n in norms):
        return "a norm other than LayerNorm or RMSNorm"
    if model.wpe is not None and type(model.wpe) not in (LearnedPositions, SinusoidalPositions):
        return "an unknown position encoding"
    return None


class NativeDecodeStep:
    """DecodeStep's __call__ for one unpadded row, in C (module docstring); other calls go to DecodeStep."""

    def __init__(self, model: GPT, library: ctypes.CDLL):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the native decoding step does not take this model: {reason}")
        self.model, self.fallback, self.step = model, DecodeStep(model), library.gptlab_decode_step
        config = model.config
        C, hs = config.embed_dim, config.head_dim
        sizes = [C, C, C, 3 * C, model.blocks[0].mlp.fc.out_features]  # x, x_norm, y, qkv, h (native_step.c)
        self.scratch = torch.empty(sum(sizes), dtype=torch.float32)
        self.quantized_input = torch.empty(max(m.in_features for m in step_linears(model)), dtype=torch.uint8)
        self.layers = (_Layer * config.num_layers)(
            *(
                _Layer(
                    _norm(block.norm_1),
                    _norm(block.norm_2),
                    _matrix(block.attn.qkv),
                    _matrix(block.attn.proj),
                    _matrix(block.mlp.fc),
                    _matrix(block.mlp.proj),
                )
                for block in model.blocks
            )
        )
        table = model.wte.weight
        x, x_norm, y, qkv, h = self.scratch.split(sizes)
        self.scores: torch.Tensor | None = None  # (nh * max_len,), made for the first cache
        self.struct = _Model(
            n_layers=config.num_layers,
            dim=C,
            n_heads=config.n_heads,
            head_dim=hs,
            threads=torch.get_num_threads(),
            activation=ACTIVATIONS[config.activation],
            qk_norm_eps=config.norm_eps if config.qk_norm else -1.0,
            softcap=config.logit_softcap or 0.0,
            embeddings=table.data_ptr(),
            embed_row=table.stride(0),
            embed_col=table.stride(1),
            norm_f=_norm(model.norm_f),
            head=_matrix(model.lm_head),
            layers=self.layers,
            x=x.data_ptr(),
            x_norm=x_norm.data_ptr(),
            y=y.data_ptr(),
            qkv=qkv.data_ptr(),
            h=h.data_ptr(),
            xq=self.quantized_input.data_ptr(),
        )
        # A slot's position vector or RoPE angles: its row of one of these tables.
        wpe, rotary = model.wpe, model.rotary
        table = wpe.weight if isinstance(wpe, LearnedPositions) else None if wpe is None else wpe.table  # sinusoidal
        self.positions = _rows(table)
        self.cos, self.sin = (None, None) if rotary is None else (_rows(rotary.cos), _rows(rotary.sin))
        self.struct_ref = ctypes.byref(self.struct)
        self.bound: KVCache | None = None
        self.vocab, self.seq_len = model.lm_head.out_features, config.seq_len
        self.bans = torch.Size([self.vocab]), torch.bool  # the banned ids the C step reads: one byte an id

    def _bind(self, cache: KVCache) -> None:
        """Point every layer at `cache`'s keys and values (one row: (L, 1, nh, max_len, hs))."""
        if not (cache.keys.is_contiguous() and cache.values.is_contiguous()):
            raise ValueError("the native decoding step needs a KV cache as KVCache makes it (contiguous)")
        for i, layer in enumerate(self.layers):
            layer.keys, layer.values = cache.keys[i].data_ptr(), cache.values[i].data_ptr()
        self.struct.max_len = cache.max_len
        size = self.model.config.n_heads * cache.max_len
        if self.scores is None or self.scores.numel() < size:
            self.scores = torch.empty(size, dtype=torch.float32)
            self.struct.scores = self.scores.data_ptr()
        self.bound = cache

    def _takes(self, ids: torch.Tensor, cache: KVCache) -> bool:
        """Whether this call is one the C step computes: one unpadded row, a float32 cache."""
        return len(ids) == 1 and cache.pad is None and cache.keys.dtype == torch.float32

    def _run(self, ids: torch.Tensor, cache: KVCache, banned: torch.Tensor | None, best: torch.Tensor | None):
        """The step in C for one row: returns its logits (1, V); the greedy choice into `best` if given."""
        if cache is not self.bound:
            self._bind(cache)
        slot = cache.length
        if slot >= self.seq_len or slot >= cache.max_len:  # their one-line errors
            self.model.check_positions(slot, 1)
            cache.start(1)
        logits = torch.empty(1, self.vocab, dtype=torch.float32)
        rows = self.positions, self.cos, self.sin  # this slot's row of each table, or None
        position, cos, sin = (table and table[0] + slot * table[1] for table in rows)
        banned, best = _pointer(banned), _pointer(best)
        self.step(self.struct_ref, ids.item(), slot, position, cos, sin, logits.data_ptr(), banned, best)
        cache.advance(1)
        return logits

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) of the token ids (B,) that follow each row's cached slots, as DecodeStep's."""
        return self._run(ids, cache, None, None) if self._takes(ids, cache) else self.fallback(ids, cache)

    def greedy(self, ids: torch.Tensor, cache: KVCache, banned: torch.Tensor | None = None) -> torch.Tensor:
        """The next id (B,) of each row after `ids`: the largest of __call__'s logits with the
        `banned` ids (V,) bool excluded. For one row, the C step finds it while the logits are
        still in the processor's cache, which spares PyTorch's operations on them."""
        if not self._takes(ids, cache) or (banned is not None and (banned.shape, banned.dtype) != self.bans):
            logits = self(ids, cache)
            return (logits if banned is None else logits.masked_fill(banned, float("-inf"))).max(dim=-1).indices
        best = torch.empty(1, dtype=torch.long)
        self._run(ids, cache, None if banned is None else banned.contiguous(), best)
        return best


def decodes_natively(model: nn.Module) -> bool:
    """Whether decode_step(model) will be a NativeDecodeStep: the model is one it takes, and the
    library builds here (this builds it, the first time)."""
    return unsupported(model) is None and native_library() is not None


def decode_step(model: GPT) -> DecodeStep | NativeDecodeStep:
    """The decoding step for `model`: the native one where it can be (faster: BENCHMARKS.md), else DecodeStep."""
    return NativeDecodeStep(model, native_library()) if decodes_natively(model) else DecodeStep(model)


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab" / "native"


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def _processor() -> str:
    """What -march=native compiles for: a library built on one processor may not run on another
    (a home directory shared between machines), so the cache keys on it."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [line for line in cpuinfo if line.startswith(("model name", "flags"))]
        return "".join(lines[:2])  # the first processor's
    except OSError:
        return platform.processor()


@cache
def native_library() -> ctypes.CDLL | None:
    """native_step.c built for this machine (once; then from the cache), or None: no compiler,
    a failed build, or GPTLAB_NATIVE=0."""
    compiler = _compiler()
    if os.environ.get("GPTLAB_NATIVE", "1") == "0" or compiler is None:
        return None
    # Tried in order: the first set of flags this compiler accepts builds the library.
    for flags in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        all_flags = ["-O3", "-shared", "-fPIC", "-std=c99", *flags]
        build = " ".join([*compiler, *all_flags, platform.machine(), _processor()])
        key = hashlib.sha256(SOURCE.read_bytes() + build.encode()).hexdigest()[:16]
        built = _cache_dir() / f"native_step-{key}.so"
        if not built.exists() and not _build(compiler, all_flags, built):
            continue
        try:
            library = ctypes.CDLL(str(built))
        except OSError:
            continue
        library.gptlab_decode_step.restype = None
        library.gptlab_decode_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64, ctypes.c_int64]
        library.gptlab_decode_step.argtypes += [ctypes.c_void_p] * 6
        library.gptlab_product.restype = None
        library.gptlab_product.argtypes = [ctypes.POINTER(_Matrix), *[ctypes.c_void_p] * 3, ctypes.c_int64]
        return library
    return None


def _build(compiler: list[str], flags: list[str], target: Path) -> bool:
    """Compile native_step.c into `target`, written whole or not at all; False if the build fails."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [*compiler, *flags, str(SOURCE), "-o", str(built), "-lm"]
            if subprocess.run(command, capture_output=True, timeout=120).returncode != 0:
                return False
            os.replace(built, target)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
