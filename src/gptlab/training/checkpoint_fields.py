"""Every field of a loaded checkpoint checked in one place: types and ranges, before any is used.

A checkpoint that torch reads can still hold anything where a number or a state belongs (a
string as the step, a tensor as tokens_seen, a cut RNG state); each such value is a GptlabError
naming the field here, instead of a traceback wherever the value is first used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

from gptlab.errors import GptlabError

MT_KEYS = 624  # words of a Mersenne Twister state (numpy's and Python's generators)


def check_fields(raw: dict[str, Any], path: Path) -> None:
    """GptlabError naming the first field of `raw` (a checkpoint's dict) of the wrong type or
    out of range. The configs and tokenizer are checked where they are rebuilt."""
    _count(raw["step"], "step", path)
    _count(raw["epoch"], "epoch", path)
    state = raw["model"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        _bad(path, "model", "is not a dict of named tensors")
    if raw.get("optimizer") is not None:
        check_optimizer_state(raw["optimizer"], path)
    if raw.get("rng") is not None:
        check_rng_state(raw["rng"], path, "rng")
    if not isinstance(raw.get("gptlab_version", ""), str):
        _bad(path, "gptlab_version", "is not a string")
    extra = raw.get("extra")
    if extra is None:
        return
    if not isinstance(extra, dict):
        _bad(path, "extra", "is not a dict")
    for name, minimum in (("tokens_seen", 0), ("epoch_batches_done", 0), ("train_tokens", 0), ("step_batch", 1)):
        if name in extra:
            _count(extra[name], f"extra.{name}", path, minimum)
    if extra.get("grad_scaler") is not None and not isinstance(extra["grad_scaler"], dict):
        _bad(path, "extra.grad_scaler", "is not a dict")
    if extra.get("bf16_fast") is not None and not isinstance(extra["bf16_fast"], bool):
        _bad(path, "extra.bf16_fast", "is not true or false")
    ranks = extra.get("rank_rng")
    if ranks is not None:
        if not isinstance(ranks, list):
            _bad(path, "extra.rank_rng", "is not a list")
        for rank, rng in enumerate(ranks):
            check_rng_state(rng, path, f"extra.rank_rng[{rank}]")


@contextmanager
def restoring(path: str | Path, field: str) -> Iterator[None]:
    """Put a checkpoint's state back into live objects (optimizer, generators): whatever they
    raise on a value that passed the checks above (a state of the wrong length, moments of
    another shape) is a GptlabError naming the field."""
    try:
        yield
    except GptlabError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, numpy and random raise many types for bad states
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        _bad(Path(path), field, f"cannot be restored ({reason})")


def check_optimizer_state(state: Any, path: Path) -> None:
    """An optimizer set's {"optimizers": {name: state}} or one torch optimizer's state dict."""
    if isinstance(state, dict) and "optimizers" in state:
        if not isinstance(state["optimizers"], dict) or not state["optimizers"]:
            _bad(path, "optimizer.optimizers", "is not a dict of optimizer states")
        for name, one in state["optimizers"].items():
            _check_torch_optimizer(one, path, f"optimizer.optimizers.{name}")
    else:
        _check_torch_optimizer(state, path, "optimizer")


def _check_torch_optimizer(state: Any, path: Path, field: str) -> None:
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("state"), dict)
        or not isinstance(state.get("param_groups"), list)
    ):
        _bad(path, field, "is not an optimizer state (a dict with 'state' and 'param_groups')")
    for group in state["param_groups"]:
        if not (
            isinstance(group, dict)
            and isinstance(group.get("params"), list)
            and all(_is_int(i) for i in group["params"])
        ):
            _bad(path, f"{field}.param_groups", "holds a group without a list of parameter ids")
    for key, values in state["state"].items():
        if not isinstance(values, dict) or not all(
            isinstance(v, torch.Tensor | float) or _is_int(v) for v in values.values()
        ):
            _bad(path, f"{field}.state[{key!r}]", "is not a dict of tensors and numbers")


def check_rng_state(rng: Any, path: Path, field: str) -> None:
    """What capture_rng_state() writes: torch's state, CUDA's, numpy's and Python's."""
    if not isinstance(rng, dict):
        _bad(path, field, "is not a dict of generator states")
    if not _is_byte_tensor(rng.get("torch")):
        _bad(path, f"{field}.torch", "is not a 1-D uint8 tensor")
    cuda = rng.get("cuda")
    if cuda is not None and not (isinstance(cuda, list) and all(_is_byte_tensor(t) for t in cuda)):
        _bad(path, f"{field}.cuda", "is not a list of 1-D uint8 tensors")
    numpy_state = rng.get("numpy")
    if numpy_state is not None:
        keys = numpy_state.get("keys") if isinstance(numpy_state, dict) else None
        if not (isinstance(keys, torch.Tensor) and keys.shape == (MT_KEYS,) and not keys.is_floating_point()):
            _bad(path, f"{field}.numpy.keys", f"is not a tensor of {MT_KEYS} integers")
        if not (keys.min() >= 0 and keys.max() < 2**32):
            _bad(path, f"{field}.numpy.keys", "holds values outside 0..2**32-1")
        _count(numpy_state.get("pos"), f"{field}.numpy.pos", path, 0, MT_KEYS)
        _count(numpy_state.get("has_gauss"), f"{field}.numpy.has_gauss", path, 0, 1)
        if not isinstance(numpy_state.get("cached_gaussian"), float | int) or isinstance(
            numpy_state["cached_gaussian"], bool
        ):
            _bad(path, f"{field}.numpy.cached_gaussian", "is not a number")
    python_state = rng.get("python")
    if python_state is not None:
        words = python_state.get("state") if isinstance(python_state, dict) else None
        if not (
            isinstance(words, list)
            and len(words) == MT_KEYS + 1
            and all(_is_int(w) and 0 <= w < 2**32 for w in words[:-1])
            and _is_int(words[-1])
            and 0 <= words[-1] <= MT_KEYS
        ):
            _bad(path, f"{field}.python.state", f"is not {MT_KEYS} 32-bit words and a position")
        if not _is_int(python_state.get("version")):
            _bad(path, f"{field}.python.version", "is not an integer")
        gauss = python_state.get("gauss_next")
        if gauss is not None and not isinstance(gauss, float):
            _bad(path, f"{field}.python.gauss_next", "is not a float")


def _count(value: Any, field: str, path: Path, minimum: int = 0, maximum: int | None = None) -> None:
    if not _is_int(value):
        _bad(path, field, f"is {_shown(value)}, not an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        _bad(path, field, f"is {value}, not {bounds}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_byte_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _bad(path: Path, field: str, problem: str) -> NoReturn:
    raise GptlabError(
        f"{path}: field {field!r} {problem}; the checkpoint is damaged, resume from another one or re-save it"
    )
