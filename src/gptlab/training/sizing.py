"""A model sized to the time budget: the largest of a ladder of smaller models that the budget
lets see enough text.

A recipe's model is chosen on one machine. On a machine that computes three times slower, the
same minutes show the same model a third of the text: the run ends undertrained, where a smaller
model would have read the text more often and learned more from it. With `train.size_to_budget`
(a number of training tokens per parameter) and a time budget, the trainer times a few optimizer
steps of the configured model, then of smaller ones (two thirds of the layers, down to 4; then
the next smaller of the widths 384, 256, 192, 128, 96, 64), and trains the first, largest first,
whose measured speed would show it at least that many tokens per parameter before the budget (or
its epochs) ends; the smallest when none would. The seconds spent timing come out of the budget.
A narrower model than configured takes AdamW's learning rate scaled by the widths' ratio
(learning_rate_for); Muon's stays.

Timing is eager (no torch.compile) and at a learning rate of 0, so that it costs the same as a
step and can never diverge; the random generators are seeded again afterwards, so the run is the
one a config naming the chosen size (and that learning rate) would give. A resumed run keeps the
size its checkpoint has.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig, validated
from gptlab.data import iterate_batches
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.batching import RankMicroBatches
from gptlab.training.distributed import World
from gptlab.training.optim import build_optimizer, set_lr
from gptlab.training.precision import Precision
from gptlab.training.step import optimizer_step
from gptlab.training.tasks import task_for

MIN_LAYERS = 4  # the depth of the smaller recipes measured (BENCHMARKS.md); below it the ladder narrows
# 64, 96, 128, 192, 256, 384, ...: each about 3/4 or 2/3 of the next, the widths small GPTs are given.
WIDTHS = sorted({2**k for k in range(6, 15)} | {3 * 2**k for k in range(5, 14)})
TIMED_SECONDS = 1.0  # time at least this long (and at least TIMED_STEPS steps) after one warm-up step
TIMED_STEPS = 2
MAX_TIMED_STEPS = 10


def smaller(cfg: ModelConfig) -> ModelConfig | None:
    """The next rung of the ladder below `cfg`: two thirds of its layers (not under MIN_LAYERS),
    else the next smaller of WIDTHS that makes whole heads of even size, else None. Value
    embeddings keep their count where the fewer layers can take it (two layers a table)."""
    if cfg.num_layers > MIN_LAYERS:
        layers = max(MIN_LAYERS, cfg.num_layers * 2 // 3)
        tables = min(cfg.value_embeddings, layers // 2)
        return validated(ModelConfig, {**cfg.model_dump(), "num_layers": layers, "value_embeddings": tables})
    for width in sorted(WIDTHS, reverse=True):
        if width < cfg.embed_dim and width % cfg.n_heads == 0 and width // cfg.n_heads % 2 == 0:
            return validated(ModelConfig, {**cfg.model_dump(), "embed_dim": width})
    return None


def ladder(cfg: ModelConfig) -> list[ModelConfig]:
    """`cfg`, then every smaller rung, largest first."""
    rungs = [cfg]
    while (next_rung := smaller(rungs[-1])) is not None:
        rungs.append(next_rung)
    return rungs


def shape(cfg: ModelConfig) -> str:
    """'layers x width'."""
    return f"{cfg.num_layers} x {cfg.embed_dim}"


@dataclass(frozen=True)
class Sizing:
    """What sizing chose, and what it cost."""

    model_cfg: ModelConfig
    learning_rate: float  # AdamW's, for that model's width (learning_rate_for)
    seconds: float  # spent timing steps: taken from the time budget
    notice: str  # one line for the run's log


def learning_rate_for(chosen: ModelConfig, configured: ModelConfig, learning_rate: float) -> float:
    """The AdamW learning rate (embeddings, head, norms; every weight without Muon) for the chosen
    model: the configured one times configured width / chosen width. A narrower model takes larger
    Adam steps, in proportion to 1 / width as µP has it, so the rate a recipe was tuned with at its
    own width carries over (BENCHMARKS.md, "the sized cpu-10min's learning rates": at 128 wide, twice
    the rate tuned at 256 was better). Muon's rate stays: its updates are normalised per matrix."""
    return learning_rate * configured.embed_dim / chosen.embed_dim


def check_sizable(model_cfg: ModelConfig, train_cfg: TrainConfig, world: World, fine_tuning: bool) -> None:
    """GptlabError when size_to_budget cannot apply to this run."""
    problem = None
    if train_cfg.time_budget is None:
        problem = "needs a time budget (--time_budget)"
    elif model_cfg.model != "gpt":
        problem = "sizes a GPT; an encoder-decoder Transformer's size is set by its config"
    elif fine_tuning:
        problem = "sizes a model trained from scratch; --init_from fixes the size"
    elif world.distributed:
        problem = "sizes a single-process run (each process would time its own steps); set the size under torchrun"
    if problem:
        raise GptlabError(f"size_to_budget {problem}; drop --size_to_budget")


@dataclass(frozen=True)
class TimedOn:
    """What each candidate size is timed on: the run's data, optimizer settings and batch."""

    data_cfg: DatasetConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer | None
    train_set: Any
    device: torch.device
    step_batch: int  # windows per optimizer step


def size_to_budget(
    model_cfg: ModelConfig, on: TimedOn, max_steps: int, resumed: tuple[Path, ModelConfig] | None = None
) -> Sizing:
    """The ladder's largest model that the time budget, at its measured tokens/s, shows at least
    size_to_budget tokens per parameter, or the smallest when none would; for a run `resumed`
    from (checkpoint, its model config), that model, which must be one of the ladder's."""
    rungs, train_cfg = ladder(model_cfg), on.train_cfg
    if resumed is not None:
        path, saved = resumed
        if saved not in rungs:
            raise GptlabError(
                f"{path} holds a {shape(saved)} model, not one that --size_to_budget picks from this config "
                f"({', '.join(shape(cfg) for cfg in rungs)}); resume with the config it was trained with"
            )
        notice = f"--size_to_budget: {shape(saved)}, the size the resumed checkpoint was given"
        return sized(saved, model_cfg, train_cfg, 0.0, notice)
    if len(rungs) == 1:
        notice = f"--size_to_budget: {shape(model_cfg)} (no smaller size to choose: nothing timed)"
        return sized(model_cfg, model_cfg, train_cfg, 0.0, notice)
    started = time.perf_counter()
    wanted = train_cfg.size_to_budget
    max_tokens = max_steps * on.step_batch * model_cfg.seq_len  # the epochs or max_steps may end the run first
    tried = []
    for cfg in rungs:
        rate, params = measure(cfg, on)
        seconds_left = train_cfg.time_budget - (time.perf_counter() - started)
        per_param = min(rate * seconds_left, max_tokens) / params
        tried.append(f"{shape(cfg)}: {params / 1e6:.2f}M parameters at {rate:,.0f} tokens/s, {per_param:.2f}")
        if per_param >= wanted or cfg is rungs[-1]:
            break
    seconds = time.perf_counter() - started
    if seconds >= train_cfg.time_budget:
        raise GptlabError(
            f"timing {len(tried)} model sizes took {seconds:.1f}s, all of time_budget {train_cfg.time_budget:g}s; "
            "raise --time_budget or drop --size_to_budget"
        )
    verdict = "the largest that reaches it" if per_param >= wanted else "none reaches it: the smallest"
    notice = (
        f"--size_to_budget {wanted:g} tokens per parameter: {shape(cfg)} ({verdict}; "
        f"{'; '.join(tried)} tokens per parameter in the budget); timing took {seconds:.1f}s of it"
    )
    return sized(cfg, model_cfg, train_cfg, seconds, notice)


def sized(chosen: ModelConfig, configured: ModelConfig, train_cfg: TrainConfig, seconds: float, notice: str) -> Sizing:
    """The Sizing of `chosen`, with AdamW's learning rate for its width; the log line says when
    that rate differs from the configured one."""
    learning_rate = learning_rate_for(chosen, configured, train_cfg.learning_rate)
    if learning_rate != train_cfg.learning_rate:
        notice += f"; AdamW learning rate {train_cfg.learning_rate:g} -> {learning_rate:g}, for the narrower model"
    return Sizing(chosen, learning_rate, seconds, notice)


def measure(cfg: ModelConfig, on: TimedOn) -> tuple[float, int]:
    """(training tokens per second, parameters) of the model `cfg` on the first batches of the
    run's training set, timed eagerly after one warm-up step."""
    data_cfg, train_cfg, device = on.data_cfg, on.train_cfg, on.device
    task = task_for(cfg, data_cfg, train_cfg, on.tokenizer)
    model = task.build_model().to(device)
    model.train()
    optimizer = build_optimizer(model, train_cfg, device)
    set_lr(optimizer, 0.0)  # the same work as a training step, without moving anywhere
    precision = Precision(train_cfg.dtype, device)
    rows = RankMicroBatches(task.epoch_data(on.train_set, 1), data_cfg.batch_size, 0, 1, task.num_targets)
    first = list(itertools.islice(iterate_batches(rows, on.step_batch, shuffle=False, seed=0, epoch=1), 3))
    batches = itertools.cycle(first)

    def step() -> int:
        return optimizer_step(
            model, task, next(batches), optimizer, precision, World(), device, train_cfg.grad_clip
        ).tokens

    step()  # warm-up: first-call allocations and kernel choices
    tokens, steps, started = 0, 0, time.perf_counter()
    while steps < MAX_TIMED_STEPS and (steps < TIMED_STEPS or time.perf_counter() - started < TIMED_SECONDS):
        tokens += step()
        steps += 1
    return tokens / (time.perf_counter() - started), model.num_params()
