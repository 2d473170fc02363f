"""Step sweep: many one-change variants of cpu-10min trained for the same number of steps, side by side.

    python benchmarks/step_sweep.py --device cuda --steps 1750 --seeds 1 2 3 --parallel 14

A 10-minute CPU run of cpu-10min is limited by its steps (its last evaluation is its best), about
1,750 of them on a fast Zen 4. At a fixed step count, what a change does to a step's learning does
not depend on the machine's speed, so a GPU can train dozens of variants at once (one process each:
a model this small leaves the GPU mostly idle), in minutes instead of a CPU's hours. What a change
costs in steps is the CPU's to say: the winners go on to benchmarks/ablation.py at the real budget.
The rows `steps × 0.9` and `× 1.1` show what a tenth of the steps is worth, to weigh a change that
is slower or faster on the CPU.

Each (change, seed) trains in its own process at the size the walks fix (4 × 192), then is
evaluated on the whole of val.txt and of the held-out test.txt. Seeds move the result more than most
changes do, so each change is compared with the baseline of the same seed ("Δ", the mean of those
paired differences; "wins", on how many seeds it was lower). Writes the table to --report and into
the marked step-sweep section of --benchmarks (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speedrun  # noqa: E402
from ablation_walks import BEFORE_SHORTLIST_WALK, SCHEDULE_WALK_SIZE, Change  # noqa: E402
from speedrun import ROOT, add_benchmarks_flags, add_text_flags, command_line, update_section  # noqa: E402

from gptlab.config import build_configs  # noqa: E402
from gptlab.data import TokenDataset  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.files import write_atomic  # noqa: E402
from gptlab.presets import load_preset  # noqa: E402
from gptlab.tokenizers import load_tokenizer  # noqa: E402

PRESET = "cpu-10min"
ADAMW_LR = SCHEDULE_WALK_SIZE["learning_rate"]
# Every run: the preset as the sweep ran (before the walks its winners led to: β1 0.9, as the
# labels below say), the walks' fixed size, steps instead of a budget, eager (a compile per process
# would cost more than the run), evaluations rarer (only the whole-text one at the end is compared).
FIXED = {
    **BEFORE_SHORTLIST_WALK,
    **SCHEDULE_WALK_SIZE,
    "time_budget": None,
    "compile": False,
    "eval_interval": 250,
    "checkpoint_every": 1000,
}
BASELINE = "cpu-10min (the baseline)"
CHANGES = [
    Change("Muon lr 0.02 → 0.015", {"muon_lr": 0.015}),
    Change("Muon lr 0.02 → 0.03", {"muon_lr": 0.03}),
    Change("Muon lr 0.02 → 0.01", {"muon_lr": 0.01}),
    Change("AdamW lr × 0.5", {"learning_rate": ADAMW_LR / 2}),
    Change("AdamW lr × 2", {"learning_rate": ADAMW_LR * 2}),
    Change("AdamW β1 0.9 → 0.8", {"beta1": 0.8}),
    Change("AdamW β2 0.99 → 0.95", {"beta2": 0.95}),
    Change("decay over the last 25 % of the steps", {"decay_fraction": 0.25}),
    Change("decay over the last 60 % of the steps", {"decay_fraction": 0.6}),
    Change("learning-rate floor 0.1 → 0", {"min_lr_ratio": 0.0}),
    Change("weight decay 0.2 → 0", {"weight_decay": 0.0}),
    Change("weight decay 0.2 → 0.1", {"weight_decay": 0.1}),
    Change("weight average decay 0.99 → 0.995", {"ema_decay": 0.995}),
    Change("weight average decay 0.99 → 0.98", {"ema_decay": 0.98}),
    Change("warmup 30 → 100 steps", {"warmup_steps": 100}),
    Change("Muon's momentum warmup 300 → 600 steps", {"muon_momentum_warmup": 600}),
    Change("no gradient clipping", {"grad_clip": 0.0}),
    Change("label smoothing 0.05", {"label_smoothing": 0.05}),
    Change("logits soft-capped at 30", {"logit_softcap": 30.0}),
    Change("projections start at zero", {"zero_init_projections": True}),
    Change("RoPE base 10,000 → 1,000", {"rope_theta": 1000.0}),
    Change("no biases", {"bias": False}),
    Change("3 heads of 64", {"n_heads": 3}),
    Change("6 heads of 32", {"n_heads": 6}),
    Change("MLP 3 × wide instead of 4 ×", {"expansion_factor": 3}),
    Change("5 layers", {"num_layers": 5}),
    Change("224 wide", {"embed_dim": 224, "learning_rate": 0.004 * 256 / 224}),
    # The first rounds' winners together.
    Change("β1 0.8, Muon lr 0.015", {"beta1": 0.8, "muon_lr": 0.015}),
    Change("β1 0.8, Muon lr 0.015, momentum warmup 600", {"beta1": 0.8, "muon_lr": 0.015, "muon_momentum_warmup": 600}),
    Change("β1 0.8, Muon lr 0.015, decay over 60 %", {"beta1": 0.8, "muon_lr": 0.015, "decay_fraction": 0.6}),
    Change("β1 0.8, Muon lr 0.015, AdamW lr × 0.5", {"beta1": 0.8, "muon_lr": 0.015, "learning_rate": ADAMW_LR / 2}),
    Change("steps × 0.9"),  # the baseline with fewer or more steps: what a step is worth
    Change("steps × 1.1"),
]
STEPS_FACTOR = {"steps × 0.9": 0.9, "steps × 1.1": 1.1}


def job_specs(changes: list[Change], args: argparse.Namespace) -> list[dict]:
    """One JSON-able job per (change, seed), seed by seed, so that an early stop leaves whole seeds."""
    specs = []
    for seed in args.seeds:
        for index, change in enumerate([Change(BASELINE), *changes]):
            steps = round(args.steps * STEPS_FACTOR.get(change.label, 1.0))
            specs.append({"label": change.label, "values": {**change.values, "max_steps": steps}, "seed": seed,
                          "name": f"row{index:02d}-s{seed}", "device": args.device, "work_dir": str(args.work_dir)})  # fmt: skip
    return specs


def train_and_evaluate(spec: dict) -> dict:
    """Train one job's model (in the process this runs in) and evaluate it on the whole texts."""
    from gptlab.training import evaluate, load_model, train  # the heavy import, in the job's process only

    work = Path(spec["work_dir"])
    name = spec["name"]
    values = {
        **load_preset(PRESET).values, **FIXED, **spec["values"], "seed": spec["seed"], "device": spec["device"],
        "experiment_name": name, "log_dir": str(work / "runs"), "checkpoint_dir": str(work / "checkpoints" / name),
    }  # fmt: skip
    model_cfg, data_cfg, train_cfg = build_configs(values)
    tokenizer = load_tokenizer(None, work / "tokenizers" / PRESET)
    data = work / "data"
    result = train(model_cfg, data_cfg, train_cfg, tokenizer, data / f"{PRESET}-train", data / f"{PRESET}-val",
                   progress=False)  # fmt: skip
    model, _, _ = load_model(result.final_checkpoint, spec["device"])

    def bits_per_byte(part: str) -> float:
        whole = TokenDataset(data / f"{PRESET}-{part}", model.config.seq_len)
        return evaluate(model, whole, batch_size=data_cfg.batch_size, device=spec["device"]).bits_per_byte

    return {**spec, "val": bits_per_byte("val"), "test": bits_per_byte("test"), "steps": result.steps}


def run_in_process(spec: dict) -> dict:
    """train_and_evaluate in a fresh process (each its own CUDA context and threads); its result back."""
    done = subprocess.run(
        [sys.executable, __file__, "--job", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not results:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GptlabError(f"the run of {spec['label']!r}, seed {spec['seed']}, failed: {last}")
    return json.loads(results[-1])


def report(results: list[dict], args: argparse.Namespace) -> str:
    """The table: each change's mean, its paired difference from the baseline, its wins, its test bpb."""
    base = {r["seed"]: r["val"] for r in results if r["label"] == BASELINE}
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for label, runs in by_label.items():
        paired = [r["val"] - base[r["seed"]] for r in runs if r["seed"] in base]
        delta = statistics.fmean(paired) if paired and label != BASELINE else None
        rows.append((delta if delta is not None else 0.0, label, runs, paired, delta))
    lines = [
        f"## Step sweep: {len(by_label) - 1} changes to {PRESET}, each trained for {args.steps:,} steps",
        "",
        f"{command_line('step_sweep.py')}, device {args.device}, seeds "
        f"{', '.join(map(str, args.seeds))}. Each row trains {PRESET} at 4 × 192 with one change for the same "
        "number of steps and evaluates it on the whole validation and held-out texts; Δ is the mean over the "
        "seeds of its difference from the baseline's run of the same seed, wins the seeds on which it was lower.",
        "",
        "| change | val bpb (mean) | Δ vs baseline | wins | test bpb | per seed |",
        "|---|---:|---:|:---:|---:|---|",
    ]
    for _, label, runs, paired, delta in sorted(rows, key=lambda row: row[0]):
        runs = sorted(runs, key=lambda r: r["seed"])
        wins = "" if delta is None else f"{sum(d < 0 for d in paired)}/{len(paired)}"
        lines.append(
            f"| {label} | {statistics.fmean(r['val'] for r in runs):.4f} | "
            f"{'' if delta is None else f'{delta:+.4f}'} | {wins} | {statistics.fmean(r['test'] for r in runs):.4f} | "
            f"{', '.join(format(r['val'], '.4f') for r in runs)} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1750, help="optimizer steps of every run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds of every row (default: 1 2)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once, one process each (default: 1)")
    parser.add_argument("--rows", type=int, default=None, help="only the first N changes (default: all)")
    parser.add_argument("--device", default="cuda", help="cuda, cpu, ... (default: %(default)s)")
    add_text_flags(parser)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "step-sweep.md", help="Markdown file to write")
    add_benchmarks_flags(parser)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "step-sweep", help="tokenizers, data, logs")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: one run, in its own process
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    if args.steps < 1 or args.parallel < 1:
        raise GptlabError(f"--steps and --parallel must be 1 or more, got {args.steps} and {args.parallel}")
    speedrun.check_texts(args.train_data, args.val_data, args.test_data)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    speedrun.prepare_recipe(load_preset(PRESET), args.train_data, args.val_data, args.work_dir, args.test_data)
    specs = job_specs(CHANGES[: args.rows], args)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(run_in_process, specs):
            results.append(result)
            print(f"{result['label']:<44} seed {result['seed']}: val {result['val']:.4f}", flush=True)
    text = report(results, args)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.report, text.encode("utf-8"))
    print(text)
    if args.benchmarks is not None:
        update_section(args.benchmarks, "step-sweep", text)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.job is not None:  # a run of the sweep, in the process the sweep started for it (OMP_NUM_THREADS set)
        print(json.dumps(train_and_evaluate(json.loads(args.job))), flush=True)
        return 0
    return speedrun.main(argv, build_parser(), run)


if __name__ == "__main__":
    sys.exit(main())
