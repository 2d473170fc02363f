"""RunProgress: where a training run stands (step, epoch, position in the epoch, tokens seen, the
random generators), saved into a checkpoint and restored from one.

A checkpoint keeps these as it always has, so every checkpoint ever written resumes: step and
epoch at the top level, this rank's generators under "rng", and the rest in its "extra" dict
(`epoch_batches_done`, `tokens_seen`, `step_batch`, `train_tokens`, `grad_scaler`, and under
torchrun `rank_rng`, one generator state per rank). Keys a checkpoint lacks (written before
they existed) take the values that mean "at the end of the epoch, nothing else known".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptlab.config import DatasetConfig, ModelConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint import Checkpoint, restore_rng_state
from gptlab.training.checkpoint_fields import restoring
from gptlab.training.distributed import World


@dataclass
class RunProgress:
    """The position of a run. step counts optimizer steps taken; epoch is the epoch in progress
    (1-based once the loop starts); epoch_batches_done its optimizer steps done so far."""

    step: int = 0
    epoch: int = 0
    epoch_batches_done: int = 0
    tokens_seen: int = 0
    # What a resumed run must match (checkpoint.check_resumable): windows per optimizer step, and
    # the training data's token count standing for the data itself. None: not recorded.
    step_batch: int | None = None
    train_tokens: int | None = None
    grad_scaler: dict[str, Any] | None = None  # Precision's loss-scaler state
    # Whether bf16 was fast on the CPU that trained (device.fast_bf16): the precision of --dtype auto
    # and of Muon's iteration, kept by a resumed run instead of measured again. None: not recorded.
    bf16_fast: bool | None = None
    rng: dict[str, Any] | None = None  # the saving process's generators (capture_rng_state)
    rank_rngs: list[dict[str, Any]] | None = field(default=None, repr=False)  # every rank's, under torchrun

    def to_extra(self) -> dict[str, Any]:
        """The checkpoint's "extra" entries for this progress (step, epoch and rng have their own keys)."""
        extra: dict[str, Any] = {
            "epoch_batches_done": self.epoch_batches_done,
            "tokens_seen": self.tokens_seen,
            "step_batch": self.step_batch,
            "train_tokens": self.train_tokens,
            "grad_scaler": self.grad_scaler,
            "bf16_fast": self.bf16_fast,
        }
        if self.rank_rngs is not None:
            extra["rank_rng"] = self.rank_rngs
        return extra

    @staticmethod
    def recorded_bf16_fast(checkpoint: Checkpoint | None) -> bool | None:
        """The bf16 decision a checkpoint recorded (None: no checkpoint, or one from before it was kept)."""
        return None if checkpoint is None else checkpoint.extra.get("bf16_fast")

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, batches_per_epoch: int) -> RunProgress:
        """The progress a checkpoint recorded (its fields already checked by load_checkpoint)."""
        extra = checkpoint.extra
        rng = checkpoint.raw.get("rng")
        rank_rngs = extra.get("rank_rng")
        return cls(
            step=checkpoint.step,
            epoch=checkpoint.epoch,
            epoch_batches_done=int(extra.get("epoch_batches_done", batches_per_epoch)),
            tokens_seen=int(extra.get("tokens_seen", 0)),
            step_batch=int(extra.get("step_batch", checkpoint.data_config.batch_size)),
            train_tokens=int(extra["train_tokens"]) if extra.get("train_tokens") is not None else None,
            grad_scaler=extra.get("grad_scaler"),
            bf16_fast=cls.recorded_bf16_fast(checkpoint),
            rng=rng if isinstance(rng, dict) else None,
            rank_rngs=rank_rngs if isinstance(rank_rngs, list) else None,
        )

    def start(self, batches_per_epoch: int) -> tuple[int, int]:
        """(epoch, batch) at which the loop continues: the next epoch once this one is done."""
        if self.epoch_batches_done >= batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.epoch_batches_done

    def restore_rng(self, world: World, seed: int, path: str | Path) -> None:
        """Put back this rank's random generators, so that dropout and sampling continue as if never stopped."""
        if self.rank_rngs is not None and len(self.rank_rngs) == world.world_size:
            with restoring(path, f"extra.rank_rng[{world.rank}]"):
                restore_rng_state(self.rank_rngs[world.rank])
            return
        with restoring(path, "rng"):
            restore_rng_state(self.rng)
        if world.distributed:  # another process count: not exact anyway, but masks differ per rank
            torch.manual_seed(((seed + self.step) * world.world_size + world.rank) % 2**63)


def check_resumable(
    checkpoint: Checkpoint,
    saved: RunProgress,
    path: str | Path,
    model_cfg: ModelConfig,
    data_cfg: DatasetConfig,
    tokenizer: Tokenizer,
    step_batch: int | None = None,
    *,
    seed: int | None = None,
    train_tokens: int | None = None,
) -> None:
    """GptlabError unless a run with these settings can continue `checkpoint` (whose progress is `saved`) exactly.

    step_batch is the windows per optimizer step (batch_size * grad_accum_steps, default
    batch_size): it fixes the data position, so it must match; how it is split does not matter.
    The seed, shuffle and shift_windows settings fix the windows and their order, and the training
    data's token count (checkpoints record it) stands for the data itself: the position means
    nothing in other data."""
    if checkpoint.tokenizer.fingerprint() != tokenizer.fingerprint():
        raise GptlabError(f"{path} was trained with another tokenizer; resume with the tokenizer it was trained with")
    mine, theirs = model_cfg.model_dump(), checkpoint.model_config.model_dump()
    differ = [name for name in mine if mine[name] != theirs[name]]
    if saved.step_batch != (step_batch or data_cfg.batch_size):
        differ.append("batch_size * grad_accum_steps")
    if data_cfg.shuffle != checkpoint.data_config.shuffle:
        differ.append("shuffle")
    if data_cfg.shift_windows != checkpoint.data_config.shift_windows:
        differ.append("shift_windows")
    if seed is not None and (data_cfg.shuffle or data_cfg.shift_windows) and seed != checkpoint.train_config.seed:
        differ.append("seed")
    theirs_tokens = saved.train_tokens
    if train_tokens is not None and theirs_tokens is not None and theirs_tokens != train_tokens:
        differ.append(f"training data ({theirs_tokens:,} tokens; this run's has {train_tokens:,})")
    if differ:
        raise GptlabError(f"{path} was trained with other {', '.join(differ)}; resume with the checkpoint's settings")
    if checkpoint.optimizer_state is None:
        raise GptlabError(f"{path} holds no optimizer state, so it cannot be resumed; train from scratch")
    if saved.rng is None:
        raise GptlabError(
            f"{path} holds no random generator states, so it cannot be resumed exactly; train from scratch"
        )
