"""Time-budgeted training: the learning-rate schedule is planned against the budget, so the last
step runs at the floor; evaluation and saving are not spent from it; a budget too short for one
step is a clear error. A simulated clock makes every training step take a fixed time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import gptlab.training.reporting as reporting
import gptlab.training.run_clock as run_clock
import gptlab.training.tasks as tasks_module
import gptlab.training.trainer as trainer_module
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers import load_tokenizer
from gptlab.training import load_checkpoint, train
from gptlab.training.optim import estimate_total_steps
from gptlab.training.run_files import read_step_log

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
PEAK, MIN_LR_RATIO = 3e-3, 0.1


@pytest.mark.parametrize(
    ("step", "train_seconds", "budget_s", "seconds_per_step", "cap", "expected"),
    [
        (2, 2.0, 10.0, None, 50, 50),  # not yet timed: the step-count plan
        (4, 4.0, 10.0, 1.0, 50, 10),  # six more one-second steps fit
        (4, 4.0, 10.5, 1.0, 50, 11),  # a part step left over is still taken (the budget check follows it)
        (7, 0.7, 1.0, 0.1, 50, 10),  # (1.0 - 0.7) / 0.1 = 3.0000000000000004 is three steps, not four
        (4, 4.0, 1000.0, 1.0, 50, 50),  # the budget outlasts the plan
        (9, 12.0, 10.0, 1.0, 50, 10),  # over budget: the step about to be taken is the last
    ],
)
def test_estimate_total_steps(step, train_seconds, budget_s, seconds_per_step, cap, expected):
    assert estimate_total_steps(step, train_seconds, budget_s, seconds_per_step, cap) == expected


class SimulatedClock:
    """Stands in for the trainer's `time` module: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Each optimizer step takes step_seconds[i] (the last entry repeats); every evaluation takes
    100 s and every checkpoint save 50 s, which a budget must not count."""
    clock = SimulatedClock()
    clock.step_seconds = [1.0]
    clock.steps = clock.evaluations = clock.saves = 0
    real_step, real_evaluate, real_save = (
        trainer_module.optimizer_step,
        tasks_module.evaluate,
        trainer_module.save_checkpoint,
    )

    def timed_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        clock.now += clock.step_seconds[min(clock.steps, len(clock.step_seconds) - 1)]
        clock.steps += 1
        return result

    def slow_evaluate(*args, **kwargs):
        clock.now += 100.0
        clock.evaluations += 1
        return real_evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        clock.now += 50.0
        clock.saves += 1
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(run_clock, "time", clock)  # the trainer's clock mixin reads it too
    monkeypatch.setattr(reporting, "time", clock)  # and its reporting mixin, which times evaluations
    monkeypatch.setattr(trainer_module, "optimizer_step", timed_step)
    monkeypatch.setattr(tasks_module, "evaluate", slow_evaluate)
    monkeypatch.setattr(trainer_module, "save_checkpoint", slow_save)
    return clock


def budgeted_run(tmp_path: Path, **train_settings):
    text = TRAIN_TEXT.read_text(encoding="utf-8")[:12_000]  # about 45 steps of 4 x 16 tokens
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    (tmp_path / "eval.txt").write_text(text[:2_000], encoding="utf-8")
    settings = {
        "epochs": 1, "learning_rate": PEAK, "min_lr_ratio": MIN_LR_RATIO, "warmup_steps": 2, "eval_interval": 4,
        "eval_batches": 1, "save_every_steps": 3, "experiment_name": "budget", "device": "cpu", "seed": 0,
        "checkpoint_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    return train(
        ModelConfig(embed_dim=32, num_layers=1, n_heads=2, seq_len=16, dropout=0.0),
        DatasetConfig(batch_size=4),
        TrainConfig(**{**settings, **train_settings}),
        load_tokenizer(None, TOKENIZER),
        tmp_path / "train.txt",
        tmp_path / "eval.txt",
        progress=False,
    )


def logged_lrs(tmp_path: Path) -> list[float]:
    return [entry["lr"] for entry in read_step_log(tmp_path / "runs" / "budget" / "metrics.jsonl")]


@pytest.mark.parametrize(
    ("step_seconds", "budget_s", "expected_steps"),
    [
        ([1.0], 10.0, 10),
        ([10.0, 10.0, 10.0, 1.0], 40.0, 13),  # slow first steps (compilation) do not set the pace
    ],
)
def test_budgeted_schedule_ends_at_the_floor_when_the_budget_ends(
    tmp_path, clock, one_thread, step_seconds, budget_s, expected_steps
):
    clock.step_seconds = step_seconds
    result = budgeted_run(tmp_path, time_budget=budget_s)

    # Evaluations (100 s each) and saves (50 s each) happened and were not spent from the budget.
    assert clock.evaluations >= 2 and clock.saves >= 3
    assert (result.stopped_reason, result.steps) == ("time_budget", expected_steps)
    lrs = logged_lrs(tmp_path)
    assert len(lrs) == expected_steps
    assert abs(lrs[-1] - MIN_LR_RATIO * PEAK) <= 1e-9 * PEAK
    assert all(later <= earlier for earlier, later in zip(lrs[2:], lrs[3:]))  # decays after warmup
    assert math.isclose(max(lrs), PEAK)

    # The final evaluation and checkpoint were done, at the last step.
    assert result.eval is not None
    assert result.final_checkpoint.exists() and load_checkpoint(result.final_checkpoint).step == expected_steps


def test_budgeted_wsd_schedule_decays_over_the_budgets_last_steps(tmp_path, clock, one_thread):
    result = budgeted_run(tmp_path, time_budget=20.0, lr_schedule="wsd", decay_fraction=0.5)
    assert (result.stopped_reason, result.steps) == ("time_budget", 20)
    lrs = logged_lrs(tmp_path)
    floor = MIN_LR_RATIO * PEAK
    # The last step is step 19: the decay takes its last 10 steps (round(0.5 * 19)), in equal strides.
    assert lrs[2:9] == pytest.approx([PEAK] * 7)
    assert lrs[9:] == pytest.approx([PEAK + (floor - PEAK) * (s - 9) / 10 for s in range(9, 20)])


def test_budget_longer_than_the_step_plan_ends_at_the_floor_too(tmp_path, clock, one_thread):
    result = budgeted_run(tmp_path, time_budget=1000.0, max_steps=6)
    assert (result.stopped_reason, result.steps) == ("max_steps", 6)
    assert abs(logged_lrs(tmp_path)[-1] - MIN_LR_RATIO * PEAK) <= 1e-9 * PEAK


def test_budget_too_short_for_one_step_is_a_clear_error(tmp_path, clock, one_thread):
    clock.step_seconds = [2.0]
    message = r"^time_budget 0\.5s is too short to take one training step \(a step took 2s\); raise it$"
    with pytest.raises(GptlabError, match=message):
        budgeted_run(tmp_path, time_budget=0.5)
