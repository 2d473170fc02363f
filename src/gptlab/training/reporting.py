"""The reporting half of a training run (a mixin of trainer.Trainer): its log, the line and
TensorBoard scalars of each step and of each logging interval, and the configuration it announces.

The methods read the Trainer's state (its configs, model, throughput, progress). Evaluations
are timed, so that a time budget leaves them out.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from gptlab.training import run_files
from gptlab.training.metrics import EvalResult, format_mfu, model_flops_utilization, peak_memory_bytes
from gptlab.training.multiple_choice import ChoiceResult
from gptlab.training.run_log import RunLog


class RunReporting:
    """Logging for Trainer: open the log, record steps, evaluate and record intervals, announce, close."""

    def _open_logs(self) -> None:
        if self.world.is_main:  # a run killed while writing left its temporary files behind
            run_files.remove_stale_temporaries(self.checkpoint_dir, self.log_dir, self.train_cfg.experiment_name)
        resume_step = self.progress.step if self.resumed else None
        self.log = RunLog(
            self.log_dir, self.world.is_main, self.show_progress, self.total_steps, self.progress.step, resume_step
        )
        self._announce()

    def _record_step(self, loss: float, grad_norm: float, lr: float, tokens: int) -> None:
        self.log.scalars(self.progress.step, {"train/loss": loss, "grad_norm": grad_norm, "lr": lr})
        rate = self.throughput.rate()
        mfu = model_flops_utilization(self.flops_per_token, rate, self._total_peak())
        self.log.step(
            {
                "step": self.progress.step,
                "epoch": self.progress.epoch,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
            },
            {"epoch": self.progress.epoch, "loss": f"{loss:.4f}", "tok_s": f"{rate:,.0f}", "mfu": format_mfu(mfu)},
        )

    def _total_peak(self) -> float | None:
        return self.peak_flops * self.world.world_size if self.peak_flops else None

    def _log_interval(self) -> None:
        """A log line (and TensorBoard scalars) for the steps since the previous one, with an evaluation."""
        tokens_per_s = self.throughput.rate()
        mfu = model_flops_utilization(self.flops_per_token, tokens_per_s, self._total_peak())
        self.throughput.reset()
        self.train_loss = float(np.mean(self.interval_losses))
        self.interval_losses = []
        self.last_log_step = self.progress.step
        memory = peak_memory_bytes(self.device)
        line = (
            f"step {self.progress.step}/{self.planned_steps} | epoch {self.progress.epoch} | "
            f"train loss {self.train_loss:.4f} | "
            f"lr {self.last_lr:.2e} | {tokens_per_s:,.0f} tokens/s | MFU {format_mfu(mfu)} | "
            f"peak mem {memory / 2**20:,.0f} MiB"
        )
        if self.eval_set is not None:
            result = self._evaluate()  # on every rank: FSDP's forward needs them all
            line += f" | val loss {result.loss:.4f} | ppl {result.perplexity:.2f} | bpb {result.bits_per_byte:.4f}"
            if result.exact_match is not None:
                line += f" | exact match {100 * result.exact_match:.1f}%"
        if self.choice_task is not None:
            task = self._evaluate_task()
            line += f" | task acc {task.acc:.4f} | acc_norm {task.acc_norm:.4f}"
        self.log.scalars(
            self.progress.step, {"tokens_per_s": tokens_per_s, "peak_memory_mib": memory / 2**20, "mfu": mfu}
        )
        self.log.print(line)

    def _announce(self) -> None:
        """Print the resolved configuration and write it to <log_dir>/<experiment>/config.json."""
        if not self.world.is_main:
            return
        summary = {
            "model": self.model_cfg.model_dump(),
            "data": self.data_cfg.model_dump(),
            "train": self.train_cfg.model_dump(),
            "tokenizer": {"kind": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size},
            "device": str(self.device),
            "dtype": self.precision.name,
            "world_size": self.world.world_size,
            "parallelism": "fsdp" if self.world.fsdp else "ddp" if self.world.distributed else "none",
            "grad_accum_steps": self.grad_accum_steps,
            "sequences_per_step": self.step_batch,
            "num_params": self.plain_model.num_params(),
            "trainable_params": sum(p.numel() for p in self.plain_model.parameters() if p.requires_grad),
            "train_tokens": self.train_set.num_tokens,
            "batches_per_epoch": self.batches_per_epoch,
            "total_steps": self.total_steps,
        }
        lora = [self.lora.summary()] if self.lora is not None else []  # trainable against total parameters
        self.log.announce(summary, self.log_dir / "config.json", lora + self.notices)

    def _averaged(self) -> contextlib.AbstractContextManager:
        """Evaluations see the weight average when the run keeps one (weight_average.py)."""
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def _close(self) -> None:
        self.log.close()

    def _evaluate(self) -> EvalResult:
        started = time.perf_counter()
        with self._averaged():
            result = self.task.evaluate(
                self.model, self.eval_set, self.train_cfg.eval_batches, self.device, self.precision.dtype
            )
        self.excluded_seconds += time.perf_counter() - started
        self.last_eval = result
        scalars = {"val/loss": result.loss, "val/bpb": result.bits_per_byte, "val/exact_match": result.exact_match}
        self.log.scalars(self.progress.step, scalars)
        return result

    def _evaluate_task(self) -> ChoiceResult:
        """Score --eval_task with the unwrapped model (no DDP, no recompiles for its varying shapes;
        under FSDP2 it is the sharded module, so every rank takes part, as its forward needs)."""
        started = time.perf_counter()
        with self._averaged():
            result = self.choice_task.evaluate(
                self.plain_model, self.data_cfg.batch_size, self.device, self.precision.dtype
            )
        self.excluded_seconds += time.perf_counter() - started
        self.last_task = result
        self.log.scalars(self.progress.step, {"val/task_acc": result.acc, "val/task_acc_norm": result.acc_norm})
        return result
