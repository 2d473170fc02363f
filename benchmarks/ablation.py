"""Ablation: how `cpu-10min` was chosen, one change at a time, in validation bits per byte.

    python benchmarks/ablation.py --budget 2m [--seed 1] [--rows N] [--report docs/ablation.md]

Starts from `nanogpt-char` (nanoGPT's GPU recipe for Shakespeare-char) and walks the CHANGES below in
order. Each row applies one change to the best recipe so far, trains it for --budget of wall-clock
time on shakespeare/train.txt and evaluates it on the whole of val.txt (exactly as
benchmarks/speedrun.py does). A change is kept when it lowers bits per byte and dropped otherwise,
so every row is measured against the row that it changed ("Δ vs kept"). Greedy and one seed: a
difference of a few thousandths is within run-to-run noise (the speedrun's two seeds show how much).
The report is rewritten after every row, so an interrupted ablation keeps what it measured; at
the end it also goes into the marked ablation section of --benchmarks (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from dataclasses import dataclass, field
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
from speedrun import (  # noqa: E402
    ROOT,
    SHAKESPEARE,
    Recipe,
    RunResult,
    add_benchmarks_flags,
    checked_budget,
    describe_budget,
    run_once,
    update_section,
)

BASELINE = "nanogpt-char"


@dataclass(frozen=True)
class Change:
    """One row of the ablation: config values to set and/or a different tokenizer."""

    label: str
    values: dict[str, object] = field(default_factory=dict)
    tokenizer: TokenizerRecipe | None = None


BPE = "default"  # our byte-level BPE
# The order is deliberate: first what makes steps cheaper (more steps in the budget), then the
# tokenizer, then the architecture, then the optimizer and precision, then size again.
CHANGES = [
    Change("no dropout (a run is shorter than one epoch)", {"dropout": 0.0}),
    Change("batch 64 → 16 sequences (4× the optimizer steps)", {"batch_size": 16}),
    Change("warmup 100 → 30 steps", {"warmup_steps": 30}),
    Change("6 layers × 384 wide → 4 × 256", {"num_layers": 4, "embed_dim": 256, "n_heads": 4}),
    Change("characters → our BPE with 2048 ids", tokenizer=TokenizerRecipe(BPE, 2048)),
    Change("BPE with 4096 ids", tokenizer=TokenizerRecipe(BPE, 4096)),
    Change("BPE with 1024 ids", tokenizer=TokenizerRecipe(BPE, 1024)),
    Change("learned positions → RoPE", {"pos_encoding": "rope"}),
    Change("LayerNorm → RMSNorm", {"norm": "rmsnorm"}),
    Change("GELU → ReLU²", {"activation": "relu2"}),
    Change("no biases", {"bias": False}),
    Change("untied output head", {"tie_embeddings": False}),
    Change("peak learning rate 1e-3 → 2e-3", {"learning_rate": 2e-3}),
    Change("bf16 autocast", {"dtype": "bf16"}),
    Change("Muon for the blocks' matrices", {"optimizer": "muon"}),
    Change("context 256 → 128 tokens, batch ×2", {"seq_len": 128, "batch_size": 32}),
    Change("6 layers × 384 wide again", {"num_layers": 6, "embed_dim": 384, "n_heads": 6}),
    Change("torch.compile", {"compile": True}),
]


@dataclass(frozen=True)
class Row:
    label: str
    run: RunResult
    delta: float | None  # bpb minus the kept row it changed; None for the baseline
    kept: bool


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


def report(rows: list[Row], kept: Preset, args: argparse.Namespace, budget_s: float) -> str:
    command = "python benchmarks/ablation.py " + " ".join(sys.argv[1:])
    lines = [
        f"## Ablation: how cpu-10min was chosen ({describe_budget(budget_s)} a row)",
        "",
        f"Command: `{command}`, run on {datetime.date.today()} with torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, seed {args.seed}. Each row changes one thing in the best recipe "
        "so far (the last kept row), trains for the budget and is evaluated on the whole validation text. "
        "A change is kept if it lowers bits per byte. One seed: differences of a few thousandths are noise.",
        "",
        "| # | change | val bpb | Δ vs kept | kept | steps | tokens/s | parameters |",
        "|---:|---|---:|---:|:---:|---:|---:|---:|",
    ]
    for number, row in enumerate(rows):
        delta = "" if row.delta is None else f"{row.delta:+.4f}"
        r = row.run
        lines.append(
            f"| {number} | {row.label} | {r.bpb:.4f} | {delta} | {'yes' if row.kept else 'no'} | {r.steps} | "
            f"{r.tokens_per_s:,.0f} | {r.params / 1e6:.2f}M |"
        )
    baseline = load_preset(BASELINE).values
    changed = ", ".join(f"{k}={v}" for k, v in kept.values.items() if baseline.get(k) != v)
    lines += ["", f"Kept recipe: tokenizer {kept.tokenizer.describe()}; {changed}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="2m", help="training time per row: 120, 2m, ... (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="one seed for every row (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=None, help="stop after this many changes (default: all)")
    parser.add_argument("--train_data", type=Path, default=SHAKESPEARE / "train.txt", help="training text")
    parser.add_argument(
        "--val_data", type=Path, default=SHAKESPEARE / "val.txt", help="validation text, evaluated whole"
    )
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "ablation.md", help="Markdown file to write")
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
    args.report.parent.mkdir(parents=True, exist_ok=True)
    texts = TokenizedTexts(args.train_data, args.val_data, args.work_dir)

    def measure(number: int, preset: Preset) -> RunResult:
        recipe = texts.recipe(f"row{number:02d}", preset)
        return run_once(recipe, args.seed, budget_s, {}, args.work_dir, args.device, not args.no_progress)

    kept = load_preset(BASELINE)
    rows = [Row(f"{BASELINE} (the baseline)", measure(0, kept), None, True)]
    best = rows[0].run.bpb
    for number, change in enumerate(CHANGES[: args.rows], start=1):
        candidate = apply(kept, change)
        result = measure(number, candidate)
        better = result.bpb < best
        rows.append(Row(change.label, result, result.bpb - best, better))
        if better:
            kept, best = candidate, result.bpb
        write_atomic(args.report, report(rows, kept, args, budget_s).encode("utf-8"))
    text = report(rows, kept, args, budget_s)
    write_atomic(args.report, text.encode("utf-8"))
    print(text)
    print(f"written to {args.report}")
    if args.benchmarks is not None:
        update_section(args.benchmarks, "ablation", text)
        print(f"and into the ablation section of {args.benchmarks}")
    return rows


def main(argv: list[str] | None = None) -> int:
    return speedrun.main(argv, build_parser(), run)


if __name__ == "__main__":
    sys.exit(main())
