"""The training loop: epochs of AdamW steps, with evaluation, checkpoints and logs along the way.

Checkpoints are `<checkpoint_dir>/<experiment_name>_e<epoch>.pth`, saved every `checkpoint_every`
epochs and once more at the end, whatever stopped the run. A run stopped mid-epoch (max_steps,
time_budget, Ctrl-C) names its final checkpoint after the epoch in progress (1-based), and records
how many of that epoch's batches were done under extra["epoch_batches_done"], so that a run
resumed from it continues exactly where it stopped.
A non-finite loss stops the run with GptlabError and saves nothing, so the last good checkpoint stays.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.data import iterate_batches, num_batches
from gptlab.device import autocast, configure_backend, resolve_device
from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint import (
    check_resumable,
    load_checkpoint,
    load_weights,
    restore_rng_state,
    save_checkpoint,
)
from gptlab.training.metrics import (
    EvalResult,
    Throughput,
    format_mfu,
    model_flops_utilization,
    peak_flops,
)
from gptlab.training.optim import build_optimizer, load_optimizer_state, lr_at, set_lr, total_steps
from gptlab.training.tasks import task_for

StopReason = Literal["completed", "max_steps", "time_budget", "interrupted", "nan"]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind.

    train_loss is the mean training loss over the last logging interval (the steps since the
    log line before it, at most eval_interval);
    elapsed_s is wall-clock time of the loop, evaluation included.
    """

    final_checkpoint: Path
    steps: int
    epochs_completed: int
    train_loss: float
    eval: EvalResult | None
    tokens_seen: int
    elapsed_s: float
    stopped_reason: StopReason


def train(
    model_cfg: ModelConfig,
    data_cfg: DatasetConfig,
    train_cfg: TrainConfig,
    tokenizer: Tokenizer,
    train_data: str | Path,
    eval_data: str | Path | None = None,
    progress: bool = True,
    resume: str | Path | None = None,
) -> TrainResult:
    """Train the model that model_cfg.model names and save checkpoints: a GPT on `train_data`
    as raw text or prepared data, or an encoder-decoder Transformer on TSV/JSONL pairs.

    From scratch, or continuing the checkpoint `resume` (same model, data and batch size) exactly
    as if it had never stopped. Raises GptlabError for bad settings or data, and when the loss
    becomes nan/inf. Ctrl-C saves a checkpoint and returns with stopped_reason "interrupted".
    """
    return Trainer(model_cfg, data_cfg, train_cfg, tokenizer, train_data, eval_data, progress, resume).run()


def resolve_vocab_size(model_cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """A copy of `model_cfg` whose tgt_vocab_size is the tokenizer's when unset; larger is allowed
    (rounded-up embedding tables), smaller is an error."""
    if model_cfg.tgt_vocab_size is None:
        return model_cfg.model_copy(update={"tgt_vocab_size": tokenizer.vocab_size})
    if model_cfg.tgt_vocab_size < tokenizer.vocab_size:
        raise GptlabError(
            f"tgt_vocab_size {model_cfg.tgt_vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); use --tgt_vocab_size {tokenizer.vocab_size} or more, or leave it unset"
        )
    return model_cfg.model_copy()


def seed_everything(seed: int) -> None:
    """Seed every generator that weights, dropout or data order could draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class _NonFiniteLoss(Exception):
    """Raised inside the loop; turned into GptlabError once the run is wound down."""


class Trainer:
    """One training run. Construction does the setup (device, seed, data, model, optimizer, logs);
    run() loops over epochs and returns a TrainResult."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        data_cfg: DatasetConfig,
        train_cfg: TrainConfig,
        tokenizer: Tokenizer,
        train_data: str | Path,
        eval_data: str | Path | None = None,
        progress: bool = True,
        resume: str | Path | None = None,
    ):
        self.device = resolve_device(train_cfg.device)
        configure_backend(self.device)
        self.model_cfg = resolve_vocab_size(model_cfg, tokenizer)
        self.data_cfg, self.train_cfg, self.tokenizer, self.progress = data_cfg, train_cfg, tokenizer, progress
        seed_everything(train_cfg.seed)

        # What differs between model types (data, model, loss, evaluation) lives in the task.
        self.task = task_for(self.model_cfg, data_cfg, train_cfg, tokenizer)
        self.train_set = self.task.load_dataset(train_data, progress)
        self.eval_set = self.task.load_dataset(eval_data, progress) if eval_data else None
        self.batches_per_epoch = num_batches(self.train_set, data_cfg.batch_size)
        self.total_steps = total_steps(train_cfg.epochs, self.batches_per_epoch, train_cfg.max_steps)

        self.model = self.task.build_model().to(self.device)
        self.optimizer = build_optimizer(self.model, train_cfg, self.device)
        self.flops_per_token = self.model.flops_per_token()
        self.peak_flops = peak_flops(self.device)

        self.log_dir = Path(train_cfg.log_dir) / train_cfg.experiment_name
        self.checkpoint_dir = Path(train_cfg.checkpoint_dir)
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epoch in progress (1-based) once the loop starts
        self.epoch_batches_done = 0
        self.start_epoch, self.start_batch = 1, 0
        self.tokens_seen = 0
        self.eval_seconds = 0.0
        self.last_eval: EvalResult | None = None
        self.last_log_step = -1
        self.last_lr = 0.0
        self.last_saved: tuple[Path, int] | None = None  # (path, step)
        self.interval_losses: list[float] = []  # training losses since the last log line
        self.train_loss = math.nan
        self.throughput = Throughput()
        self.resumed = resume is not None
        if resume is not None:
            self._resume(Path(resume))

    def _resume(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer moments, random generators and position."""
        checkpoint = load_checkpoint(path)
        check_resumable(checkpoint, path, self.model_cfg, self.data_cfg, self.tokenizer)
        load_weights(self.model, checkpoint.model_state, path)
        load_optimizer_state(self.optimizer, checkpoint.optimizer_state)
        restore_rng_state(checkpoint.raw["rng"])
        self.step, self.epoch = checkpoint.step, checkpoint.epoch
        self.tokens_seen = int(checkpoint.extra.get("tokens_seen", 0))
        self.epoch_batches_done = int(checkpoint.extra.get("epoch_batches_done", self.batches_per_epoch))
        if self.epoch_batches_done >= self.batches_per_epoch:
            self.start_epoch, self.start_batch = self.epoch + 1, 0
        else:
            self.start_epoch, self.start_batch = self.epoch, self.epoch_batches_done
        if self.step >= self.total_steps:
            raise GptlabError(
                f"{path} has already taken {self.step} of the {self.total_steps} steps this run allows; "
                "raise epochs or max_steps to train further"
            )

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from torch.utils.tensorboard import SummaryWriter  # slow import; only a run needs it

        self._announce()
        # A resumed run drops the events its first run logged after the checkpoint.
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.step if self.resumed else None)
        self.bar = tqdm(
            total=self.total_steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True
        )
        self.started = time.perf_counter()
        try:
            reason = self._loop()
        except KeyboardInterrupt:
            reason = "interrupted"
        except _NonFiniteLoss as err:
            self._close()
            saved = self.last_saved[0] if self.last_saved else None
            kept = f"the last good checkpoint is {saved}" if saved else "no checkpoint was saved"
            cfg = self.train_cfg
            raise GptlabError(
                f"{err} at step {self.step + 1} (epoch {self.epoch}); training stopped and {kept}. Lower "
                f"learning_rate (now {cfg.learning_rate:g}) or set grad_clip (now {cfg.grad_clip:g})"
            ) from None
        except BaseException:
            self._close()
            raise
        try:
            if reason != "interrupted" and self.last_log_step != self.step:
                self._log_interval()  # a last line (and evaluation) for the model being saved
            final = self._save()
        finally:
            self._close()
        return TrainResult(
            final_checkpoint=final,
            steps=self.step,
            epochs_completed=self.epochs_completed,
            train_loss=float(np.mean(self.interval_losses)) if self.interval_losses else self.train_loss,
            eval=self.last_eval,
            tokens_seen=self.tokens_seen,
            elapsed_s=time.perf_counter() - self.started,
            stopped_reason=reason,
        )

    def _loop(self) -> StopReason:
        cfg = self.train_cfg
        self.model.train()
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            self.epoch = epoch
            self.epoch_batches_done = self.start_batch if self.epoch == self.start_epoch else 0
            for batch in iterate_batches(
                self.train_set,
                self.data_cfg.batch_size,
                self.data_cfg.shuffle,
                seed=cfg.seed,
                epoch=self.epoch,
                start_batch=self.epoch_batches_done,
            ):
                self._train_step(batch)
                if self.step % cfg.eval_interval == 0:
                    self._log_interval()
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    return "max_steps"
                if cfg.time_budget is not None and self._training_seconds() >= cfg.time_budget:
                    return "time_budget"
            if self.last_log_step != self.step:
                self._log_interval()
            if self.epoch % cfg.checkpoint_every == 0:
                self._save()
        return "completed"

    def _train_step(self, batch) -> None:
        self.throughput.start()
        batch = self.task.to_device(batch, self.device)
        lr = lr_at(self.step, self.total_steps, self.train_cfg)
        set_lr(self.optimizer, lr)
        self.last_lr = lr
        with autocast(self.device):
            loss = self.task.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping to infinity only measures the norm: it is logged either way.
        max_norm = self.train_cfg.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value, norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one sync
        if not math.isfinite(loss_value):
            raise _NonFiniteLoss(f"the training loss became {loss_value}")
        if not math.isfinite(norm_value):
            raise _NonFiniteLoss(f"the gradient norm became {norm_value}")
        self.optimizer.step()
        tokens = self.task.num_tokens(batch)
        self.throughput.stop(tokens)
        self.step += 1
        self.epoch_batches_done += 1
        self.tokens_seen += tokens
        self.interval_losses.append(loss_value)
        self._record_step(loss_value, norm_value, lr)

    # ---- evaluation, logging, checkpoints --------------------------------------------------------
    def _record_step(self, loss: float, grad_norm: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, self.step)
        self.writer.add_scalar("grad_norm", grad_norm, self.step)
        self.writer.add_scalar("lr", lr, self.step)
        self.bar.update(1)
        self.bar.set_postfix(
            epoch=self.epoch, loss=f"{loss:.4f}", tok_s=f"{self.throughput.rate():,.0f}", refresh=False
        )

    def _log_interval(self) -> None:
        """A log line (and TensorBoard scalars) for the steps since the previous one, with an evaluation."""
        tokens_per_s = self.throughput.rate()
        mfu = model_flops_utilization(self.flops_per_token, tokens_per_s, self.peak_flops)
        self.throughput.reset()
        self.train_loss = float(np.mean(self.interval_losses))
        self.interval_losses = []
        self.last_log_step = self.step
        self.writer.add_scalar("tokens_per_s", tokens_per_s, self.step)
        if mfu is not None:
            self.writer.add_scalar("mfu", mfu, self.step)
        line = (
            f"step {self.step}/{self.total_steps} | epoch {self.epoch} | train loss {self.train_loss:.4f} | "
            f"lr {self.last_lr:.2e} | {tokens_per_s:,.0f} tokens/s | MFU {format_mfu(mfu)}"
        )
        if self.eval_set is not None:
            result = self._evaluate()
            line += f" | val loss {result.loss:.4f} | ppl {result.perplexity:.2f} | bpb {result.bits_per_byte:.4f}"
            if result.exact_match is not None:
                line += f" | exact match {100 * result.exact_match:.1f}%"
        self._print(line)

    def _evaluate(self) -> EvalResult:
        started = time.perf_counter()
        result = self.task.evaluate(self.model, self.eval_set, self.train_cfg.eval_batches, self.device)
        self.eval_seconds += time.perf_counter() - started
        self.last_eval = result
        self.writer.add_scalar("val/loss", result.loss, self.step)
        self.writer.add_scalar("val/bpb", result.bits_per_byte, self.step)
        if result.exact_match is not None:
            self.writer.add_scalar("val/exact_match", result.exact_match, self.step)
        return result

    def _save(self) -> Path:
        """Save `<experiment>_e<epoch>.pth` for the epoch in progress (once per step)."""
        path = self.checkpoint_dir / f"{self.train_cfg.experiment_name}_e{max(self.epoch, 1)}.pth"
        if self.last_saved == (path, self.step):
            return path
        save_checkpoint(
            path,
            self.model,
            self.tokenizer,
            self.model_cfg,
            self.data_cfg,
            self.train_cfg,
            step=self.step,
            epoch=max(self.epoch, 1),
            optimizer=self.optimizer,
            extra={"epoch_batches_done": self.epoch_batches_done, "tokens_seen": self.tokens_seen},
        )
        self.last_saved = (path, self.step)
        self._print(f"saved checkpoint {path}")
        return path

    @property
    def epochs_completed(self) -> int:
        finished = self.epoch_batches_done >= self.batches_per_epoch
        return max(self.epoch if finished else self.epoch - 1, 0)

    def _training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.eval_seconds

    # ---- start and end ---------------------------------------------------------------------------
    def _announce(self) -> None:
        """Print the resolved configuration and write it to <log_dir>/<experiment>/config.json."""
        summary = {
            "model": self.model_cfg.model_dump(),
            "data": self.data_cfg.model_dump(),
            "train": self.train_cfg.model_dump(),
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
            "device": str(self.device),
            "num_params": self.model.num_params(),
            "train_tokens": self.train_set.num_tokens,
            "batches_per_epoch": self.batches_per_epoch,
            "total_steps": self.total_steps,
        }
        text = json.dumps(summary, indent=2)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.log_dir / "config.json", (text + "\n").encode())
        self._print(f"training configuration (also in {self.log_dir / 'config.json'}):\n{text}")

    def _print(self, message: str) -> None:
        tqdm.write(message)  # above the progress bar, not through it

    def _close(self) -> None:
        self.bar.close()
        self.writer.close()
