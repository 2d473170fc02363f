"""The training loop: epochs of optimizer steps, with evaluation, checkpoints and logs along the way.

Checkpoints (see run_files.py) are `<experiment>_e<epoch>.pth`, saved every `checkpoint_every`
epochs and once more at the end, whatever stopped the run, and `<experiment>_s<step>.pth` every
`save_every_steps` steps; `<experiment>_latest.json` names the newest. A run stopped mid-epoch
records how many of that epoch's batches were done (RunProgress, progress.py), so that a
run resumed from any checkpoint continues exactly where it stopped (bitwise on CPU), even after
SIGKILL: checkpoints and the pointer are written atomically.
A non-finite loss stops the run with GptlabError and saves nothing, so the last good checkpoint stays.
With a time budget the learning-rate schedule decays against the steps the budget is estimated to
hold, re-estimated every step, so that the last step runs at the floor (or a step's decay above it
when step times vary); evaluation and checkpoint saving are not spent from the budget, and a budget
that the first step alone uses up is a GptlabError (only a timed step can tell). The budget counts
this invocation's training time: a resumed budgeted run starts a fresh budget and plans anew from
its step (exact resume holds for unbudgeted runs only, since the plan depends on the clock).
With size_to_budget, the model's size is chosen for the budget before training (sizing.py), and
the seconds spent timing candidate sizes come out of the budget.
With ema_decay the run keeps a moving average of its weights (weight_average.py), which its
evaluations measure and its checkpoints hold as the model.
Under torchrun every rank runs this loop on its share of each batch; only rank 0 writes files,
and a checkpoint keeps every rank's random generators.
Ctrl-C stops the run once the step in progress is done and saves a checkpoint (stop_request.py).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.data import iterate_batches, num_batches
from gptlab.device import configure_backend
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer
from gptlab.training import distributed, run_files
from gptlab.training.batching import RankMicroBatches, accumulation_steps, check_divides
from gptlab.training.chat_start import chat_start
from gptlab.training.checkpoint import Checkpoint, capture_rng_state, load_checkpoint, load_weights, save_checkpoint
from gptlab.training.checkpoint_fields import restoring
from gptlab.training.compiling import compiled
from gptlab.training.lora import lora_run, refuse_without_lora
from gptlab.training.metrics import EvalResult, Throughput, device_peak_flops
from gptlab.training.multiple_choice import ChoiceResult, ChoiceTask
from gptlab.training.optim import BudgetPlan, apply_schedule, build_optimizer, total_steps
from gptlab.training.precision import Precision
from gptlab.training.progress import RunProgress, check_resumable
from gptlab.training.reporting import RunReporting
from gptlab.training.result import StopReason, TrainResult
from gptlab.training.run_clock import RunClock
from gptlab.training.run_setup import resolve_vocab_size, seed_everything
from gptlab.training.sizing import TimedOn, check_sizable, size_to_budget
from gptlab.training.step import NonFiniteLoss, optimizer_step
from gptlab.training.stop_request import StopRequest
from gptlab.training.tasks import task_for
from gptlab.training.weight_average import refuse_average_with, resumed_average, trained_state


def train(
    model_cfg: ModelConfig,
    data_cfg: DatasetConfig,
    train_cfg: TrainConfig,
    tokenizer: Tokenizer,
    train_data: str | Path,
    eval_data: str | Path | None = None,
    progress: bool = True,
    resume: str | Path | None = None,
    init_weights: Mapping[str, torch.Tensor] | None = None,
    init_from: str | None = None,
) -> TrainResult:
    """Train the model that model_cfg.model names and save checkpoints: a GPT on `train_data`
    as raw text or prepared data, or an encoder-decoder Transformer on TSV/JSONL pairs.

    From scratch, or continuing the checkpoint `resume` (same model, data and batch per step)
    exactly as if it had never stopped; resume="auto" continues the checkpoint that
    <checkpoint_dir>/<experiment_name>_latest.json names, or starts fresh when there is none.
    `init_weights` (a state dict of model_cfg's shapes, e.g. pretrained GPT-2) replaces the
    random initialisation: fine-tuning; with train_cfg.lora_rank only LoRA adapters of them train,
    and `init_from` (where they came from) is what LoRA checkpoints point to as their base.
    Under torchrun, trains data-parallel (DDP, or FSDP2 with train_cfg.fsdp). On a CPU, sets this
    process's malloc to keep freed memory for reuse (host_memory.py). Raises GptlabError
    for bad settings or data, and when the loss becomes nan/inf. Ctrl-C lets the step in progress
    finish, saves a checkpoint and returns with stopped_reason "interrupted"; a second Ctrl-C
    raises KeyboardInterrupt at once and saves nothing.
    """
    return Trainer(
        model_cfg, data_cfg, train_cfg, tokenizer, train_data, eval_data, progress, resume, init_weights, init_from
    ).run()


class Trainer(RunReporting, RunClock):
    """One training run. Construction does the setup (processes, device, seed, data, model,
    optimizer, resume); run() loops over epochs and returns a TrainResult."""

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
        init_weights: Mapping[str, torch.Tensor] | None = None,
        init_from: str | None = None,
    ):
        self.init_from = init_from
        self.world, self.device = distributed.setup(train_cfg)
        try:
            self._setup(
                model_cfg, data_cfg, train_cfg, tokenizer, train_data, eval_data, progress, resume, init_weights
            )
        except BaseException:
            distributed.teardown(self.world)
            raise

    def _setup(
        self, model_cfg, data_cfg, train_cfg, tokenizer, train_data, eval_data, progress, resume, init_weights
    ) -> None:
        configure_backend(self.device)
        if train_cfg.task == "chat":  # the chat markers join the tokenizer, with rows in any given weights
            model_cfg, tokenizer, init_weights = chat_start(
                model_cfg, tokenizer, init_weights, lora=train_cfg.lora_rank is not None
            )
        self.model_cfg = resolve_vocab_size(model_cfg, tokenizer)
        self.data_cfg, self.train_cfg, self.tokenizer = data_cfg, train_cfg, tokenizer
        self.show_progress = progress and self.world.is_main
        self.checkpoint_dir = Path(train_cfg.checkpoint_dir)
        resume, notice = run_files.resolve_resume(resume, self.checkpoint_dir, train_cfg.experiment_name)
        checkpoint = load_checkpoint(resume) if resume is not None else None
        resumed_bf16_fast = RunProgress.recorded_bf16_fast(checkpoint)  # computed as it was
        self.precision = Precision(train_cfg.dtype, self.device, resumed_bf16_fast)
        self.notices: list[str] = [line for line in (self.precision.notice, notice) if line]
        check_divides(data_cfg.batch_size, self.world.world_size)
        refuse_average_with(train_cfg, self.world.fsdp)
        if train_cfg.size_to_budget is not None:  # before any data is read
            check_sizable(self.model_cfg, train_cfg, self.world, fine_tuning=init_weights is not None)
        self.grad_accum_steps = accumulation_steps(
            data_cfg.batch_size, self.model_cfg.seq_len, train_cfg.grad_accum_steps, train_cfg.total_batch_tokens
        )
        self.step_batch = data_cfg.batch_size * self.grad_accum_steps  # windows per optimizer step
        seed_everything(train_cfg.seed)

        # What differs between model types (data, model, loss, evaluation) lives in the task.
        self.task = task_for(self.model_cfg, data_cfg, train_cfg, tokenizer)
        self.choice_task: ChoiceTask | None = None
        if train_cfg.eval_task is not None:  # read before the data: a bad file fails at once
            if self.model_cfg.model != "gpt":
                raise GptlabError("--eval_task scores a GPT's continuations, not an encoder-decoder's; drop it")
            self.choice_task = ChoiceTask.from_file(train_cfg.eval_task, tokenizer, self.model_cfg.seq_len)
        with distributed.main_first(self.world):  # rank 0 prepares the data cache, the others read it
            self.train_set = self.task.load_dataset(train_data, self.show_progress)
            self.eval_set = self.task.load_dataset(eval_data, self.show_progress) if eval_data else None
        self.batches_per_epoch = num_batches(self.train_set, self.step_batch)
        self.total_steps = total_steps(train_cfg.epochs, self.batches_per_epoch, train_cfg.max_steps)
        self.sizing_seconds = 0.0  # spent choosing the model's size: taken from the time budget
        if train_cfg.size_to_budget is not None:  # a smaller model where this machine is slower (sizing.py)
            timed_on = TimedOn(data_cfg, train_cfg, tokenizer, self.train_set, self.device, self.step_batch)
            resumed = (resume, checkpoint.model_config) if checkpoint is not None else None
            sizing = size_to_budget(self.model_cfg, timed_on, self.total_steps, resumed)
            self.model_cfg, self.sizing_seconds = sizing.model_cfg, sizing.seconds
            train_cfg = self.train_cfg = train_cfg.model_copy(update={"learning_rate": sizing.learning_rate})
            self.task = task_for(self.model_cfg, data_cfg, train_cfg, tokenizer)
            self.notices.append(sizing.notice)
            seed_everything(train_cfg.seed)  # the run a config naming this size would give

        self.plain_model = self.task.build_model()
        if init_weights is not None:  # fine-tuning: start from given weights, not a random init
            load_weights(self.plain_model, dict(init_weights), "the initial weights (--init_from)", exact_dtype=False)
        self.lora = lora_run(self.plain_model, train_cfg, init_weights, self.init_from)  # None without lora_rank
        self.plain_model.to(self.device)
        if self.world.distributed:  # same weights everywhere (drawn above), but each rank its own dropout masks
            torch.manual_seed(train_cfg.seed + self.world.rank)
        self.flops_per_token = self.plain_model.flops_per_token()
        self.model = distributed.wrap_model(self.plain_model, self.world, self.device)
        # After FSDP's sharding; Muon iterates in bf16 where the precision decided bf16 is fast.
        self.optimizer = build_optimizer(self.plain_model, train_cfg, self.device, self.precision.bf16_fast)
        if train_cfg.compile:
            rows = data_cfg.batch_size // self.world.world_size
            self.model, notice = compiled(self.model, self.model_cfg, rows, self.device, self.precision.dtype)
            self.notices += [notice] if notice else []
        self.peak_flops = device_peak_flops(self.device, self.precision.dtype, train_cfg.peak_flops)

        self.log_dir = Path(train_cfg.log_dir) / train_cfg.experiment_name
        self.progress = RunProgress(step_batch=self.step_batch, train_tokens=self.train_set.num_tokens)
        self.start_epoch, self.start_batch = 1, 0
        self.excluded_seconds = 0.0  # evaluating and saving: not training, so not spent from a time budget
        self.last_eval: EvalResult | None = None
        self.last_task: ChoiceResult | None = None
        self.last_log_step = -1
        self.last_lr = 0.0
        self.last_saved: tuple[Path, int] | None = None  # (path, step)
        self.interval_losses: list[float] = []  # training losses since the last log line
        self.train_loss = math.nan
        self.throughput = Throughput()
        self.resumed = resume is not None
        if checkpoint is not None:
            self._resume(resume, checkpoint)
        self.average = resumed_average(self.plain_model, train_cfg.ema_decay, checkpoint, resume)  # None without ema
        self.planned_steps = self.total_steps  # the schedule's plan; re-estimated every step under a time budget
        self.budget: BudgetPlan | None = None
        if train_cfg.time_budget is not None:  # counts from this invocation's first step
            budget_s = train_cfg.time_budget - self.sizing_seconds
            self.budget = BudgetPlan(budget_s, self.total_steps, first_step=self.progress.step)

    def _resume(self, path: Path, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`, read from `path`: weights, optimizer moments, loss scale,
        random generators and position."""
        saved = RunProgress.from_checkpoint(checkpoint, self.batches_per_epoch)
        cfg, train_tokens = self.train_cfg, self.train_set.num_tokens
        check_resumable(
            checkpoint,
            saved,
            path,
            self.model_cfg,
            self.data_cfg,
            self.tokenizer,
            self.step_batch,
            seed=cfg.seed,
            train_tokens=train_tokens,
        )
        if not self.world.fsdp:
            load_weights(self.plain_model, self._resumed_weights(checkpoint, path), path)
        else:
            distributed.load_full_model_state(self.plain_model, trained_state(checkpoint, path), self.world)
        with restoring(path, "optimizer"):
            distributed.load_full_optimizer_state(
                self.plain_model, self.optimizer, checkpoint.optimizer_state, self.world
            )
        with restoring(path, "extra.grad_scaler"):
            self.precision.load_state_dict(saved.grad_scaler)
        saved.restore_rng(self.world, cfg.seed, path)
        # This run's own batch and data (equal to the saved ones, or check_resumable refused them).
        self.progress = replace(saved, step_batch=self.step_batch, train_tokens=train_tokens, rng=None, rank_rngs=None)
        self.start_epoch, self.start_batch = saved.start(self.batches_per_epoch)
        if saved.step >= self.total_steps:
            raise GptlabError(
                f"{path} has already taken {saved.step} of the {self.total_steps} steps this run allows; "
                "raise epochs or max_steps to train further"
            )
        self.notices.append(f"resuming {path} at step {saved.step} (epoch {saved.epoch})")

    def _resumed_weights(self, checkpoint, path: Path) -> dict[str, torch.Tensor]:
        """The checkpoint's weights; for a LoRA run this run's base with the checkpoint's adapters."""
        if self.lora is None:
            refuse_without_lora(checkpoint.extra, path)
            return trained_state(checkpoint, path)
        return self.lora.resume_state(checkpoint, path, self.plain_model.state_dict())

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        try:
            result = self._run()
            # Rank 0 may still be writing (and fsyncing) the last checkpoint: a rank that tore its
            # process group down meanwhile would abort the run. Leave together.
            distributed.barrier(self.world)
            return result
        finally:
            distributed.teardown(self.world)

    def _run(self) -> TrainResult:
        self._open_logs()
        self.started = time.perf_counter()
        self.in_step = False
        try:
            with StopRequest(announce=self.world.is_main) as self.stop_request:
                reason = self._loop()
        except KeyboardInterrupt:
            # A second Ctrl-C means "now, without saving"; any in the middle of a step leaves a state
            # not worth saving. Otherwise (between steps, without the handler) the state is whole.
            if self.in_step or self.stop_request.requested:
                self._close()
                if self.world.is_main:
                    print(
                        f"stopped at once at step {self.progress.step}: nothing saved; {self._kept('')}",
                        file=sys.stderr,
                    )
                raise
            reason = "interrupted"
        except NonFiniteLoss as err:
            self._close()
            kept = self._kept("good ")
            cfg = self.train_cfg
            raise GptlabError(
                f"{err} at step {self.progress.step + 1} (epoch {self.progress.epoch}); training stopped and {kept}. Lower "
                f"learning_rate (now {cfg.learning_rate:g}) or set grad_clip (now {cfg.grad_clip:g})"
            ) from None
        except BaseException:
            self._close()
            raise
        try:
            if reason != "interrupted" and self.last_log_step != self.progress.step:
                self._log_interval()  # a last line (and evaluation) for the model being saved
            final = self._save()
        finally:
            self._close()
        return TrainResult(
            final_checkpoint=final,
            steps=self.progress.step,
            epochs_completed=self.epochs_completed,
            train_loss=float(np.mean(self.interval_losses)) if self.interval_losses else self.train_loss,
            eval=self.last_eval,
            tokens_seen=self.progress.tokens_seen,
            elapsed_s=time.perf_counter() - self.started,
            stopped_reason=reason,
            task=self.last_task,
        )

    def _kept(self, quality: str) -> str:
        """What a run that stopped without saving leaves: 'the last {quality}checkpoint is …'."""
        if self.last_saved is None:
            return "no checkpoint was saved"
        return f"the last {quality}checkpoint is {self.last_saved[0]}"

    def _loop(self) -> StopReason:
        cfg = self.train_cfg
        self.model.train()
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            data = self.task.epoch_data(self.train_set, epoch)
            rows = RankMicroBatches(
                data, self.data_cfg.batch_size, self.world.rank, self.world.world_size, self.task.num_targets
            )
            self.progress.epoch = epoch
            self.progress.epoch_batches_done = self.start_batch if self.progress.epoch == self.start_epoch else 0
            for micro_batches in iterate_batches(
                rows,
                self.step_batch,
                self.data_cfg.shuffle,
                seed=cfg.seed,
                epoch=epoch,
                start_batch=self.progress.epoch_batches_done,
            ):
                self._train_step(micro_batches)
                epoch_done = self.progress.epoch_batches_done >= self.batches_per_epoch
                if self.progress.step % cfg.eval_interval == 0 or (
                    epoch_done and self.last_log_step != self.progress.step
                ):
                    self._log_interval()
                if epoch_done and self.progress.epoch % cfg.checkpoint_every == 0:
                    self._save()
                if cfg.save_every_steps and self.progress.step % cfg.save_every_steps == 0:
                    self._save(every_steps=True)
                if cfg.max_steps is not None and self.progress.step >= cfg.max_steps:
                    return "max_steps"
                if self.budget is not None and self.budget.record(self.progress.step, self._training_seconds()):
                    return "time_budget"
                if self._stop_requested():
                    return "interrupted"
        return "completed"

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C asked to stop; under torchrun whether any rank's did, so that all stop together."""
        requested = self.stop_request.requested
        if self.world.distributed:
            flags = torch.tensor([float(requested)], device=self.device)
            requested = distributed.all_reduce_sum(flags, self.world).item() > 0
        return requested

    def _train_step(self, micro_batches) -> None:
        self.in_step = True
        self.throughput.start()
        lr = apply_schedule(self.optimizer, self.progress.step, self._schedule_total(), self.train_cfg)
        self.last_lr = lr
        result = optimizer_step(
            self.model,
            self.task,
            micro_batches,
            self.optimizer,
            self.precision,
            self.world,
            self.device,
            self.train_cfg.grad_clip,
        )
        if self.average is not None:
            self.average.update()
        self.throughput.stop(result.tokens)
        self.progress.step += 1
        self.progress.epoch_batches_done += 1
        self.progress.tokens_seen += result.tokens
        self.in_step = False  # the step's state is whole from here: logging it may be cut short
        self.interval_losses.append(result.loss)
        self._record_step(result.loss, result.grad_norm, lr, result.tokens)

    def _save(self, every_steps: bool = False) -> Path:
        """Save `<experiment>_e<epoch>.pth` for the epoch in progress, or with every_steps
        `<experiment>_s<step>.pth`; then point <experiment>_latest.json at it (once per step and file).

        Every rank calls this (FSDP gathers the shards); rank 0 alone writes.
        """
        cfg, directory = self.train_cfg, self.checkpoint_dir
        if every_steps:
            path = run_files.step_checkpoint(directory, cfg.experiment_name, self.progress.step)
        else:
            path = run_files.epoch_checkpoint(directory, cfg.experiment_name, max(self.progress.epoch, 1))
        if self.last_saved == (path, self.progress.step):
            return path
        started = time.perf_counter()
        model_state = distributed.full_model_state(self.model, self.plain_model, self.world)
        optimizer_state = distributed.full_optimizer_state(self.plain_model, self.optimizer, self.world)
        rank_rngs = distributed.gather_objects(capture_rng_state(), self.world)
        if self.world.is_main:
            progress = replace(
                self.progress,
                grad_scaler=self.precision.state_dict(),
                bf16_fast=self.precision.bf16_fast,
                rank_rngs=rank_rngs if self.world.distributed else None,
            )
            extra = progress.to_extra()
            if self.lora is not None:  # the adapters alone, or the merged model (training/lora.py)
                model_state = self.lora.checkpoint_state(model_state, extra)
            if self.average is not None:  # the average as the model, the trained weights for resuming
                model_state = self.average.checkpoint_state(model_state, extra)
            save_checkpoint(
                path,
                self.plain_model,
                self.tokenizer,
                self.model_cfg,
                self.data_cfg,
                cfg,
                step=self.progress.step,
                epoch=max(self.progress.epoch, 1),
                extra=extra,
                model_state=model_state,
                optimizer_state=optimizer_state,
            )
            run_files.write_latest(
                directory, cfg.experiment_name, path, self.progress.step, max(self.progress.epoch, 1)
            )
            if every_steps and cfg.keep_last is not None:
                run_files.prune_step_checkpoints(directory, cfg.experiment_name, cfg.keep_last)
            self.log.print(f"saved checkpoint {path}")
        self.last_saved = (path, self.progress.step)
        self.excluded_seconds += time.perf_counter() - started
        return path

    @property
    def epochs_completed(self) -> int:
        finished = self.progress.epoch_batches_done >= self.batches_per_epoch
        return max(self.progress.epoch if finished else self.progress.epoch - 1, 0)
