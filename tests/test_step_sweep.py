"""benchmarks/step_sweep.py: one-change variants at a fixed step count, each paired with its seed's baseline."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from test_presets import ROOT, assert_refused_in_one_line, load_script, load_speedrun

from data_files import SHAKESPEARE_TRAIN, SHAKESPEARE_VAL, read_text

STEP_SWEEP = ROOT / "benchmarks" / "step_sweep.py"


def load_step_sweep(monkeypatch):
    load_speedrun(monkeypatch)  # step_sweep.py imports it and ablation.py by name
    load_script(ROOT / "benchmarks" / "ablation.py", monkeypatch)
    return load_script(STEP_SWEEP, monkeypatch)


def test_every_change_of_the_sweep_makes_a_valid_config(monkeypatch):
    from gptlab.config import build_configs
    from gptlab.presets import load_preset

    sweep = load_step_sweep(monkeypatch)  # a misspelt field would otherwise surface on the GPU, minutes in
    args = argparse.Namespace(steps=100, seeds=[1], device="cpu", work_dir=ROOT / "runs" / "unused")
    specs = sweep.job_specs(sweep.CHANGES, args)
    assert len(specs) == len(sweep.CHANGES) + 1 and specs[0]["label"] == sweep.BASELINE
    configs = [build_configs({**load_preset(sweep.PRESET).values, **sweep.FIXED, **spec["values"]}) for spec in specs]
    assert configs[0][2].beta1 == 0.9  # the start the labels ("AdamW β1 0.9 → 0.8") and the published table name
    steps = {spec["label"]: spec["values"]["max_steps"] for spec in specs}
    assert steps[sweep.BASELINE] == 100 and steps["steps × 0.9"] == 90 and steps["steps × 1.1"] == 110


def test_each_change_is_compared_with_the_baseline_of_its_own_seed(monkeypatch):
    sweep = load_step_sweep(monkeypatch)
    runs = [  # seed 2 is the luckier seed; the change wins on seed 1 only, by more than it loses on seed 2
        (sweep.BASELINE, 1, 1.90), (sweep.BASELINE, 2, 1.80),
        ("a change", 1, 1.86), ("a change", 2, 1.81),
        ("a worse change", 1, 1.95), ("a worse change", 2, 1.85),
    ]  # fmt: skip
    results = [{"label": label, "seed": seed, "val": val, "test": val + 0.1} for label, seed, val in runs]
    args = argparse.Namespace(steps=1750, seeds=[1, 2], device="cuda")

    rows = [line for line in sweep.report(results, args).splitlines() if line.startswith("| ") and "---" not in line]

    assert rows[1].startswith("| a change | 1.8350 | -0.0150 | 1/2 | 1.9350 | 1.8600, 1.8100 |")
    assert rows[2].startswith(f"| {sweep.BASELINE} | 1.8500 |  |  |")
    assert rows[3].startswith("| a worse change | 1.9000 | +0.0500 | 0/2 |")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps and --parallel must be 1 or more"),
        (["--test_data", "/nonexistent"], "/nonexistent not found; pass --train_data/--val_data/--test_data"),
    ],
)
def test_step_sweep_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    sweep = load_step_sweep(monkeypatch)
    assert_refused_in_one_line(sweep.main, tmp_path, capsys, flags, message)


def test_step_sweep_end_to_end_on_the_cpu_at_two_steps(tmp_path):
    (tmp_path / "train.txt").write_text(read_text(SHAKESPEARE_TRAIN, 20_000))
    (tmp_path / "val.txt").write_text(read_text(SHAKESPEARE_VAL, 3_000))
    report, benchmarks = tmp_path / "sweep.md", tmp_path / "BENCHMARKS.md"
    command = [
        sys.executable, str(STEP_SWEEP), "--device", "cpu", "--steps", "2", "--seeds", "1", "--rows", "1",
        "--parallel", "2", "--train_data", str(tmp_path / "train.txt"), "--val_data", str(tmp_path / "val.txt"),
        "--test_data", str(tmp_path / "val.txt"), "--work_dir", str(tmp_path / "work"), "--report", str(report),
        "--benchmarks", str(benchmarks),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)

    text = report.read_text()
    assert text.startswith("## Step sweep: 1 changes to cpu-10min, each trained for 2 steps")
    assert text.count("\n| ") == 3  # the header, the baseline, the one change
    assert benchmarks.read_text().startswith("<!-- step-sweep:start -->\n## Step sweep")
