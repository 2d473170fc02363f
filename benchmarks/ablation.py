"""Ablation: how `cpu-10min` was chosen, one change at a time, in validation bits per byte.

    python benchmarks/ablation.py --walk smear --budget 10m [--seeds 1 2] [--rows N]
    python benchmarks/ablation.py --walk first --budget 2m [--seeds 1]

--walk names one of the walks of benchmarks/ablation_walks.py (the lists of changes, with why each was
tried; `python benchmarks/ablation.py --help` names them all). Each row applies one change to the
best recipe so far, trains it for --budget of wall-clock time on shakespeare/train.txt, once per
seed, and evaluates it on the whole of val.txt (exactly as benchmarks/speedrun.py does); the
held-out test.txt is never looked at here. A change is kept when its mean over the seeds lowers
bits per byte, so every row is measured against the row that it changed ("Δ vs kept"). Greedy: a
difference of a few thousandths is within run-to-run noise with one seed (the speedrun's two seeds
show how much). The report is rewritten after every row, so an interrupted ablation keeps what it
measured; at the end it also goes into the marked section of --benchmarks (BENCHMARKS.md) named
after the walk.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.data import prepare
from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.presets import Preset, TokenizerRecipe, load_preset
from gptlab.tokenizers import save_tokenizer
from gptlab.tokenizers.corpus import read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speedrun  # noqa: E402
from ablation_walks import WALKS, Change, Walk  # noqa: E402
from speedrun import (  # noqa: E402
    ROOT,
    SHAKESPEARE,
    Recipe,
    RunResult,
    add_benchmarks_flags,
    checked_budget,
    command_line,
    describe_budget,
    run_once,
    update_section,
)


@dataclass(frozen=True)
class Row:
    label: str
    runs: list[RunResult]  # one per seed
    delta: float | None  # mean bpb minus the kept row's; None for the baseline
    kept: bool

    @property
    def bpb(self) -> float:
        return statistics.fmean(r.bpb for r in self.runs)

    def mean(self, field: str) -> float:
        return statistics.fmean(getattr(r, field) for r in self.runs)


class TokenizedTexts:
    """Each tokenizer recipe trained and both texts tokenized once, however many rows use it."""

    def __init__(self, train_text: Path, val_text: Path, work_dir: Path):
        self.train_text, self.val_text, self.work_dir = train_text, val_text, work_dir
        self._done: dict[TokenizerRecipe, tuple] = {}

    def recipe(self, name: str, preset: Preset) -> Recipe:
        """`preset` made ready to train under `name`, its tokenizer and token files reused when seen before."""
        key = preset.tokenizer
        if key not in self._done:
            slug = key.describe().replace(", vocab ", "-")
            print(f"[ablation] training a tokenizer ({key.describe()}) on {self.train_text}", flush=True)
            tokenizer = key.train(read_corpus([self.train_text]))
            save_tokenizer(tokenizer, self.work_dir / "tokenizers" / slug)
            data = self.work_dir / "data"
            self._done[key] = (
                tokenizer,
                prepare([self.train_text], tokenizer, data / f"{slug}-train", progress=False),
                prepare([self.val_text], tokenizer, data / f"{slug}-val", progress=False),
            )
        tokenizer, train_tokens, val_tokens = self._done[key]
        return Recipe(name, preset, tokenizer, train_tokens, val_tokens)


def apply(preset: Preset, change: Change) -> Preset:
    """`preset` with one change made."""
    return dataclasses.replace(
        preset, values={**preset.values, **change.values}, tokenizer=change.tokenizer or preset.tokenizer
    )


def report(rows: list[Row], walk: Walk, kept: Preset, args: argparse.Namespace, budget_s: float) -> str:
    seeds = ", ".join(str(seed) for seed in args.seeds)
    lines = [
        f"## Ablation: {walk.title} ({describe_budget(budget_s)} a row)",
        "",
        f"{command_line('ablation.py')}, "
        f"{torch.get_num_threads()} threads, seeds {seeds}. Each row changes one thing in the best recipe "
        "so far (the last kept row), trains for the budget and is evaluated on the whole validation text "
        '(mean over the seeds). A change is kept if it lowers bits per byte. "best / last seen" are the '
        "lowest and the last of the trainer's evaluations (one validation sample): a last far above the "
        "best means the run overfitted.",
        "",
        "| # | change | val bpb | Δ vs kept | kept | best / last seen | steps | epochs | tokens/s | parameters |",
        "|---:|---|---:|---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for number, row in enumerate(rows):
        delta = "" if row.delta is None else f"{row.delta:+.4f}"
        lines.append(
            f"| {number} | {row.label} | {row.bpb:.4f} | {delta} | {'yes' if row.kept else 'no'} | "
            f"{row.mean('best_seen'):.4f} / {row.mean('last_seen'):.4f} | {row.mean('steps'):,.0f} | {row.mean('epochs'):.1f} | "
            f"{row.mean('tokens_per_s'):,.0f} | {row.runs[0].params / 1e6:.2f}M |"
        )
    preset = load_preset(walk.base).values  # as the preset is today: "no change" means the preset is the kept recipe
    changed = ", ".join(f"{k}={v}" for k, v in kept.values.items() if preset.get(k) != v)
    lines += ["", f"Kept recipe: {walk.base} with tokenizer {kept.tokenizer.describe()}; {changed or 'no change'}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walk", choices=sorted(WALKS), default="budget", help="which walk (default: %(default)s)")
    parser.add_argument("--budget", default="10m", help="training time per row: 120, 2m, ... (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds of every row (default: 1)")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many changes (default: all)")
    parser.add_argument("--train_data", type=Path, default=SHAKESPEARE / "train.txt", help="training text")
    parser.add_argument(
        "--val_data", type=Path, default=SHAKESPEARE / "val.txt", help="validation text, evaluated whole"
    )
    parser.add_argument("--report", type=Path, help="Markdown file to write (default: docs/ablation-<walk>.md)")
    add_benchmarks_flags(parser)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "ablation", help="tokenizers, data, logs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def run(args: argparse.Namespace) -> list[Row]:
    budget_s = checked_budget(args)
    if args.rows is not None and args.rows < 0:
        raise GptlabError(f"--rows must be 0 or more, got {args.rows}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.report is None:
        args.report = ROOT / "docs" / f"ablation-{args.walk}.md"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    texts = TokenizedTexts(args.train_data, args.val_data, args.work_dir)

    walk = WALKS[args.walk]

    def measure(number: int, preset: Preset) -> list[RunResult]:
        recipe = texts.recipe(f"{args.walk}{number:02d}", preset)
        progress = not args.no_progress
        return [run_once(recipe, seed, budget_s, {}, args.work_dir, args.device, progress) for seed in args.seeds]

    kept = apply(load_preset(walk.base), Change("", walk.base_values, walk.base_tokenizer))
    rows = [Row(f"{walk.base} (the start)", measure(0, kept), None, True)]
    best = rows[0].bpb
    for number, change in enumerate(walk.changes[: args.rows], start=1):
        candidate = apply(kept, change)
        row = Row(change.label, measure(number, candidate), None, False)
        row = dataclasses.replace(row, delta=row.bpb - best, kept=row.bpb < best)
        rows.append(row)
        if row.kept:
            kept, best = candidate, row.bpb
        write_atomic(args.report, report(rows, walk, kept, args, budget_s).encode("utf-8"))
    text = report(rows, walk, kept, args, budget_s)
    write_atomic(args.report, text.encode("utf-8"))
    print(text)
    print(f"written to {args.report}")
    if args.benchmarks is not None:
        update_section(args.benchmarks, walk.section, text)
        print(f"and into the {walk.section} section of {args.benchmarks}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return speedrun.main(argv, build_parser(), run)


if __name__ == "__main__":
    sys.exit(main())
