"""Checkpoints: self-contained `.pth` files holding a model, its configs and its tokenizer.

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(path,
weights_only=True)` reads it and loading never unpickles arbitrary objects:

    {"format": "gptlab-checkpoint", "version": 1, "model_type": "gpt" | "transformer",
     "model_config": dict, "data_config": dict, "train_config": dict,
     "tokenizer": {"kind": str, "files": {name: bytes}},
     "model": state_dict, "optimizer": state_dict | None, "step": int, "epoch": int,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor] | None, "numpy": dict, "python": dict},
     "gptlab_version": str, "extra": dict}

"extra" holds where the run stands (progress.py), a LoRA run's settings (lora.py) and, for a run
that keeps a weight average, the trained weights beside the average that "model" then holds
(weight_average.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig, validated_from
from gptlab.errors import GptlabError
from gptlab.files import atomic_path
from gptlab.models import GPT
from gptlab.models.lora import is_adapter_key
from gptlab.models.transformer import Transformer
from gptlab.tokenizers import tokenizer_from_files
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint_fields import check_fields
from gptlab.training.lora import read_settings

FORMAT = "gptlab-checkpoint"
VERSION = 1  # bump when the layout changes; loaders refuse versions newer than theirs
_REQUIRED_KEYS = ("model_type", "model_config", "data_config", "train_config", "tokenizer", "model", "step", "epoch")


@dataclass
class Checkpoint:
    """A loaded checkpoint, its configs validated and its tokenizer rebuilt."""

    model_config: ModelConfig
    data_config: DatasetConfig
    train_config: TrainConfig
    tokenizer: Tokenizer
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    step: int
    epoch: int
    version: int
    raw: dict[str, Any]

    @property
    def model_type(self) -> str:
        return self.raw["model_type"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.raw.get("extra") or {}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    model_cfg: ModelConfig,
    data_cfg: DatasetConfig,
    train_cfg: TrainConfig,
    *,
    step: int,
    epoch: int,
    optimizer: Any | None = None,
    extra: dict[str, Any] | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to `path` atomically (a crash never leaves a half-written file).

    `extra` holds further plain values (e.g. progress within an epoch) under the key "extra".
    model_state / optimizer_state, when given, are saved instead of model.state_dict() /
    optimizer.state_dict() (e.g. full states gathered from FSDP shards). Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_type": model_cfg.model,
        "model_config": model_cfg.model_dump(),
        "data_config": data_cfg.model_dump(),
        "train_config": train_cfg.model_dump(),
        "tokenizer": {"kind": tokenizer.kind, "files": dict(tokenizer.to_files())},
        "model": model_state if model_state is not None else unwrap(model).state_dict(),
        "optimizer": optimizer_state if optimizer_state is not None else _optimizer_state(optimizer),
        "step": int(step),
        "epoch": int(epoch),
        "rng": capture_rng_state(),
        "gptlab_version": _gptlab_version(),
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and check a checkpoint written by save_checkpoint (never unpickling code).

    Raises GptlabError when the file is missing, unreadable or truncated, is not a gptlab
    checkpoint, was written by a newer gptlab, or holds invalid configs.
    """
    path = Path(path)
    raw = _read_torch_file(path, map_location)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise GptlabError(f"{path} is a torch file but not a gptlab checkpoint; pass a .pth written by gptlab train")
    version = raw.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise GptlabError(
            f"{path} has checkpoint version {version!r} but this gptlab reads up to version {VERSION}; "
            "upgrade gptlab to load it"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in raw]
    if missing:
        raise GptlabError(
            f"{path} is an incomplete gptlab checkpoint (no {', '.join(missing)}); re-save it with gptlab"
        )
    check_fields(raw, path)
    model_config = _config(ModelConfig, raw["model_config"], path)
    if raw["model_type"] != model_config.model:
        raise GptlabError(
            f"{path} says model_type {raw['model_type']!r} but its config says {model_config.model!r}; "
            "the checkpoint is inconsistent, re-save it with gptlab"
        )
    return Checkpoint(
        model_config=model_config,
        data_config=_config(DatasetConfig, raw["data_config"], path),
        train_config=_config(TrainConfig, raw["train_config"], path),
        tokenizer=_tokenizer(raw["tokenizer"], path),
        model_state=raw["model"],
        optimizer_state=raw.get("optimizer"),
        step=int(raw["step"]),
        epoch=int(raw["epoch"]),
        version=version,
        raw=raw,
    )


# Every kind of model a checkpoint can hold, by model_type: adding a kind starts here.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"gpt": GPT, "transformer": Transformer}
_KIND_NAMES = {"gpt": "a GPT", "transformer": "an encoder-decoder Transformer"}
_KIND_FIXES = {
    "gpt": "pass a GPT checkpoint (`gptlab generate` decodes Transformer checkpoints too)",
    "transformer": "pass a checkpoint trained with --model transformer",
}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, Checkpoint]:
    """The GPT stored in a checkpoint, on `device` and in eval mode, with its tokenizer."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    check_model_type(checkpoint, path, "gpt")
    return build_model(checkpoint, path, device), checkpoint.tokenizer, checkpoint


def load_transformer(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer, Checkpoint]:
    """The encoder-decoder Transformer stored in a checkpoint, on `device` and in eval mode, with its tokenizer."""
    checkpoint = load_checkpoint(path, map_location="cpu")
    check_model_type(checkpoint, path, "transformer")
    return build_model(checkpoint, path, device), checkpoint.tokenizer, checkpoint


def check_model_type(checkpoint: Checkpoint, path: str | Path, wanted: str) -> None:
    """GptlabError unless the checkpoint holds a model of type `wanted` ("gpt", "transformer")."""
    if checkpoint.model_type != wanted:
        raise GptlabError(
            f"{path} holds {_KIND_NAMES[checkpoint.model_type]}, not {_KIND_NAMES[wanted]}; {_KIND_FIXES[wanted]}"
        )


def build_model(checkpoint: Checkpoint, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of the checkpoint's model_type holding its weights, on `device`, in eval mode."""
    cls = MODEL_CLASSES[checkpoint.model_type]
    lora = read_settings(checkpoint.extra, path)
    if lora is not None and not lora.merged and any(map(is_adapter_key, checkpoint.model_state)):
        raise GptlabError(
            f"{path} holds LoRA adapters for the base {lora.base}, not a whole model; load it with "
            "gptlab.load (the gptlab commands do), or train with --lora_save merged"
        )
    vocab = checkpoint.model_config.tgt_vocab_size
    if vocab is None or vocab < checkpoint.tokenizer.vocab_size:
        raise GptlabError(
            f"{path}: model vocabulary ({vocab}) is smaller than its tokenizer's "
            f"({checkpoint.tokenizer.vocab_size}); the checkpoint is inconsistent, re-train it"
        )
    return build_with_weights(cls, checkpoint.model_config, checkpoint.model_state, path, device)


def build_with_weights(
    cls: type[nn.Module], config: ModelConfig, state: Any, path: str | Path, device: str | torch.device = "cpu"
) -> nn.Module:
    """A `cls` model of `config` holding the weights `state`, on `device`, in eval mode.

    The model is first built on the meta device (shapes without memory) and every weight's
    shape and dtype compared with it, so a config that claims a huge model beside small weights
    is refused before anything is allocated; allocating a model that does match but does not
    fit in memory is one GptlabError too."""
    try:
        with torch.device("meta"):
            skeleton = cls(config)
    except (RuntimeError, ValueError) as err:  # sizes whose byte count overflows even on meta
        raise GptlabError(
            f"{path}: its model config describes an impossible model ({_first_line(err)}); re-save it"
        ) from None
    check_weights(skeleton, state, path)
    size = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    try:
        model = cls(config)
        model.load_state_dict(state)
        return model.to(device).eval()
    except (RuntimeError, MemoryError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        raise GptlabError(
            f"cannot allocate the model of {path} ({size / 2**30:.2f} GiB of weights) on {device} "
            f"({_first_line(err)}); free memory or use a machine with more"
        ) from None


def load_weights(model: nn.Module, state: dict[str, Any], path: str | Path, *, exact_dtype: bool = True) -> None:
    """model.load_state_dict(state), or GptlabError naming what does not match the model config."""
    check_weights(model, state, path, exact_dtype=exact_dtype)
    unwrap(model).load_state_dict(state)


def check_weights(model: nn.Module, state: Any, path: str | Path, *, exact_dtype: bool = True) -> None:
    """GptlabError unless `state` holds exactly the model's weights, each of its shape and dtype
    (with exact_dtype=False, any floating dtype where the model's is floating: imported weights)."""
    if not isinstance(state, dict):
        raise GptlabError(f"{path} holds malformed model weights; re-save the checkpoint")
    expected = unwrap(model).state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    common = sorted(expected.keys() & state.keys())
    reshaped = [k for k in common if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape]
    retyped = [
        k for k in common
        if k not in reshaped and not _same_kind(state[k].dtype, expected[k].dtype, exact_dtype)
    ]  # fmt: skip
    problems = [
        f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape:", reshaped),
            ("wrong dtype:", retyped),
        )
        if keys
    ]
    if problems:
        raise GptlabError(
            f"{path}: weights do not match the model config ({'; '.join(problems)}); re-save the checkpoint"
        )


def _same_kind(stored: torch.dtype, wanted: torch.dtype, exact: bool) -> bool:
    return stored == wanted or (not exact and stored.is_floating_point and wanted.is_floating_point)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:160]


def _optimizer_state(optimizer: Any | None) -> dict[str, Any] | None:
    return optimizer.state_dict() if optimizer is not None else None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile / DistributedDataParallel wrappers (their state_dict
    keys carry prefixes that a bare GPT would not understand)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def capture_rng_state() -> dict[str, Any]:
    """Every random generator's state, as tensors and plain values (weights_only-loadable)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Put back the generator states that capture_rng_state() recorded."""
    torch.set_rng_state(rng["torch"])
    # CUDA states come back only onto the same number of GPUs (another machine draws afresh).
    if rng.get("cuda") is not None and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng.get("numpy") is not None:
        state = rng["numpy"]
        keys = state["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))
    if rng.get("python") is not None:
        state = rng["python"]
        random.setstate((state["version"], tuple(state["state"]), state["gauss_next"]))


def _read_torch_file(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise GptlabError(f"checkpoint {path} not found; check the path (checkpoints are <experiment>_e<epoch>.pth)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # permissions, I/O: the command line prints these on one line as they are
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign, truncated or unsafe files
        # torch's own messages run to paragraphs; say which of the three cases this is instead.
        # "Weights only load failed" also ends the unpickling of random bytes ("Unsupported operand
        # 203"); only a refused global means the file really holds Python objects.
        if "Weights only load failed" in str(err) and "Unsupported global" in str(err):
            reason = "it holds Python objects, not only tensors and plain values, and gptlab will not unpickle them"
        elif "zip archive" in str(err) or "central directory" in str(err):
            reason = "it is truncated or not a torch file"
        else:
            reason = f"it is not a torch file ({type(err).__name__})"
        raise GptlabError(
            f"{path} is not a readable gptlab checkpoint: {reason}; pass a .pth written by gptlab train"
        ) from None


def _config(cls: type, values: Any, path: Path) -> Any:
    return validated_from(cls, values, path, "re-save the checkpoint")


def _tokenizer(entry: Any, path: Path) -> Tokenizer:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("kind"), str)
        or not isinstance(entry.get("files"), dict)
    ):
        raise GptlabError(f"{path} holds a malformed tokenizer entry; re-save the checkpoint")
    return tokenizer_from_files(entry["kind"], entry["files"])


def _gptlab_version() -> str:
    try:
        return metadata.version("gptlab")
    except metadata.PackageNotFoundError:
        return "unknown"
