"""LoRA in a training run and in its checkpoints.

A LoRA run fine-tunes the adapters of models/lora.py on a frozen base: the weights that
--init_from gave. Its checkpoints record, under extra["lora"],

    {"rank": int, "alpha": float, "targets": str, "base": str, "base_sha256": str, "merged": bool,
     "adapters": state_dict (merged checkpoints only)}

where `base` is the --init_from path as given and `base_sha256` the fingerprint of the base
weights the adapters were trained on. By default ("adapter") the checkpoint's model weights
are the adapters alone, a few MB for a GPT-2; loading it means loading the base again
(interop/base_models.py does), checking its fingerprint and adding the adapters. A "merged"
checkpoint holds the whole model with the adapters folded in, loadable as any other, and
keeps the adapters too, so that either kind resumes exactly (from the base that --init_from
gives again).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptlab.config import TrainConfig
from gptlab.errors import GptlabError
from gptlab.models.lora import adapter_state, apply_lora, is_adapter_key, merged_state

DEFAULT_TARGETS = "both"  # every linear layer of the blocks: QLoRA (Dettmers et al. 2023) found it matches full tuning
DEFAULT_SAVE = "adapter"


def default_alpha(rank: int) -> float:
    """alpha = 2 * rank: the update's scale alpha/rank stays 2 whatever the rank, so a learning
    rate found for one rank suits another (the paper fixes alpha for the same reason)."""
    return 2.0 * rank


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LoRASettings:
    """What a LoRA checkpoint records about its adapters and their base."""

    rank: int
    alpha: float
    targets: str
    base: str
    base_sha256: str
    merged: bool

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def entry(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": self.targets,
            "base": self.base,
            "base_sha256": self.base_sha256,
            "merged": self.merged,
        }


class LoRARun:
    """The LoRA side of one training run: adapts the model, shapes its checkpoints, resumes them."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, base_state: Mapping[str, torch.Tensor], base: str):
        rank = cfg.lora_rank
        self.settings = LoRASettings(
            rank=rank,
            alpha=cfg.lora_alpha if cfg.lora_alpha is not None else default_alpha(rank),
            targets=cfg.lora_targets or DEFAULT_TARGETS,
            base=base,
            base_sha256=fingerprint(base_state),
            merged=(cfg.lora_save or DEFAULT_SAVE) == "merged",
        )
        self.layers = apply_lora(model, rank, self.settings.alpha, self.settings.targets)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())

    def summary(self) -> str:
        s = self.settings
        return (
            f"LoRA rank {s.rank}, alpha {s.alpha:g} on {len(self.layers)} layers ({s.targets}): "
            f"{self.trainable:,} trainable of {self.total:,} parameters ({100 * self.trainable / self.total:.2f}%); "
            f"checkpoints hold {'the merged model' if s.merged else 'the adapters'}"
        )

    def checkpoint_state(
        self, full_state: Mapping[str, torch.Tensor], extra: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """The model weights a checkpoint of this run stores (adapters, or the merged model),
        given the model's whole state dict; records the settings in `extra`."""
        entry = self.settings.entry()
        adapters = adapter_state(full_state)
        if self.settings.merged:
            entry["adapters"] = adapters
            extra["lora"] = entry
            return merged_state(full_state, self.settings.scaling)
        extra["lora"] = entry
        return adapters

    def resume_state(
        self, checkpoint: Any, path: str | Path, model_state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The whole state to resume `checkpoint` (a checkpoint.Checkpoint) from: this run's base weights (`model_state`,
        the model as built from --init_from) with the checkpoint's adapters; GptlabError when the
        checkpoint is not a LoRA run of these settings on this base."""
        saved = read_settings(checkpoint.extra, path)
        if saved is None:
            raise GptlabError(f"{path} is not a LoRA checkpoint; resume it without --lora_rank")
        mine = self.settings
        differ = [
            name for name in ("rank", "alpha", "targets", "merged") if getattr(saved, name) != getattr(mine, name)
        ]
        if differ:
            flags = ", ".join(f"--lora_{'save' if n == 'merged' else n}" for n in differ)
            raise GptlabError(f"{path} was trained with other {flags}; resume with the checkpoint's LoRA settings")
        if saved.base_sha256 != mine.base_sha256:
            raise GptlabError(
                f"{path} was trained on other base weights than --init_from {mine.base} gives now "
                f"(fingerprint {mine.base_sha256[:12]}, the checkpoint's {saved.base_sha256[:12]}); "
                f"resume with the base it was trained on ({saved.base})"
            )
        adapters = saved_adapters(checkpoint.extra, path, checkpoint.model_state)
        state = {name: tensor for name, tensor in model_state.items() if not is_adapter_key(name)}
        return state | adapters


def refuse_without_lora(checkpoint_extra: Mapping[str, Any], path: str | Path) -> None:
    """A run without --lora_rank cannot continue a LoRA checkpoint (its optimizer knows only the adapters)."""
    if read_settings(checkpoint_extra, path) is not None:
        raise GptlabError(f"{path} is a LoRA run; resume it with its --init_from and --lora_rank")


def lora_run(
    model: nn.Module, cfg: TrainConfig, init_weights: Mapping[str, torch.Tensor] | None, init_from: str | None
) -> LoRARun | None:
    """Adapt `model` (already holding `init_weights`) for a LoRA run when cfg asks for one."""
    if cfg.lora_rank is None:
        return None
    if init_weights is None:
        raise GptlabError(
            "--lora_rank fine-tunes a pretrained model, and LoRA on random weights would only train a "
            "low-rank slice of a model that knows nothing: pass --init_from, or drop --lora_rank to train from scratch"
        )
    if cfg.optimizer != "adamw":
        raise GptlabError("LoRA trains its adapters with AdamW; drop --optimizer muon")
    if cfg.fsdp:
        raise GptlabError("LoRA's frozen base is not sharded with FSDP here; drop --fsdp (DDP works)")
    return LoRARun(model, cfg, init_weights, str(init_from) if init_from is not None else "(given weights)")


# ---- reading a checkpoint's entry --------------------------------------------------------------
def read_settings(extra: Mapping[str, Any], path: str | Path) -> LoRASettings | None:
    """The LoRA settings a checkpoint's extra records (None for a checkpoint of a run without
    LoRA); GptlabError naming a malformed field."""
    entry = extra.get("lora")
    if entry is None:
        return None
    types = {"rank": int, "alpha": float | int, "targets": str, "base": str, "base_sha256": str, "merged": bool}
    if not isinstance(entry, dict):
        _damaged(path, "extra.lora", "is not a dict")
    for name, kind in types.items():
        value = entry.get(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            _damaged(path, f"extra.lora.{name}", "is missing or of the wrong type")
    if entry["rank"] <= 0 or entry["alpha"] <= 0:
        _damaged(path, "extra.lora", "has a rank or alpha that is not positive")
    return LoRASettings(**{name: entry[name] for name in types} | {"alpha": float(entry["alpha"])})


def saved_adapters(
    extra: Mapping[str, Any], path: str | Path, checkpoint_model: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The adapters a LoRA checkpoint holds: its model weights (adapter checkpoints) or extra.lora.adapters (merged)."""
    settings = read_settings(extra, path)
    adapters = extra["lora"].get("adapters") if settings.merged else adapter_state(checkpoint_model)
    if (
        not isinstance(adapters, dict)
        or not adapters
        or not all(
            isinstance(k, str) and is_adapter_key(k) and isinstance(v, torch.Tensor) for k, v in adapters.items()
        )
    ):
        _damaged(path, "extra.lora.adapters" if settings.merged else "model", "holds no LoRA adapters")
    return adapters


def with_base(
    extra: Mapping[str, Any],
    path: str | Path,
    adapters: Mapping[str, torch.Tensor],
    base_state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The whole model of an adapter checkpoint: `base_state` (loaded from the base it points
    to) with the adapters merged in. GptlabError when the base's fingerprint is not the one the
    adapters were trained on, or when they do not fit it."""
    settings = read_settings(extra, path)
    found = fingerprint(base_state)
    if found != settings.base_sha256:
        raise GptlabError(
            f"{path}: its base {settings.base} has changed since the adapters were trained (fingerprint "
            f"{found[:12]}, expected {settings.base_sha256[:12]}); restore that base, or load a checkpoint "
            "saved with --lora_save merged"
        )
    layers = {name.rsplit(".", 1)[0] for name in adapters}
    missing = sorted(f"{layer}.weight" for layer in layers if f"{layer}.weight" not in base_state)
    try:
        if missing:
            raise KeyError(missing[0])
        return merged_state(dict(base_state) | dict(adapters), settings.scaling)
    except (KeyError, RuntimeError) as err:  # an adapter without its base layer, or of another shape
        raise GptlabError(f"{path}: its adapters do not fit the base {settings.base} ({err}); re-train them") from None


def _damaged(path: str | Path, field: str, problem: str) -> None:
    raise GptlabError(f"{path}: field {field!r} {problem}; the LoRA checkpoint is damaged, re-save it")
