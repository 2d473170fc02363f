"""Weight average: which decay, measured paired on one training run, in bits per byte.

    python benchmarks/weight_average.py [--preset cpu-10min] [--budget 10m] [--seed 1] [--decays 0.9 0.99 ...]

One run of the preset (its own ema_decay off) keeps, beside the weights it trains, one moving
average of them per decay (training/weight_average.py, each updated after every step). Once the
budget is over, the trained weights and every average are evaluated on the whole of val.txt and of
the held-out test.txt. All rows come from the same trajectory, so their differences carry no
seed-to-seed noise (a second seed shows how they vary). An average of decay d forgets its start as
min(d, (1 + n) / (10 + n)) after n steps: in a run of N steps every decay above (1 + N) / (10 + N)
ends as the same average; the table gives each one's decay at the last step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gptlab.config import build_configs
from gptlab.data import TokenDataset
from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.presets import load_preset
from gptlab.training import evaluate
from gptlab.training.trainer import Trainer
from gptlab.training.weight_average import WeightAverage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun import (  # noqa: E402
    ROOT,
    add_benchmarks_flags,
    add_text_flags,
    checked_budget,
    command_line,
    describe_budget,
    main,
    parse_overrides,
    prepare_recipe,
    update_section,
)


class AveragingTrainer(Trainer):
    """A Trainer that keeps one weight average per decay beside the weights it trains."""

    def __init__(self, decays: list[float], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.averages = {decay: WeightAverage(self.plain_model, decay) for decay in decays}

    def _train_step(self, micro_batches) -> None:
        super()._train_step(micro_batches)
        for average in self.averages.values():
            average.update()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-10min", help="the recipe to train (default: %(default)s)")
    parser.add_argument("--budget", default="10m", help="training time: 600, 600s, 10m, 1h (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="the run's seed (default: %(default)s)")
    parser.add_argument(
        "--decays",
        type=float,
        nargs="+",
        default=[0.9, 0.95, 0.98, 0.99, 0.995, 0.998],
        help="the averages to keep (default: %(default)s)",
    )
    add_text_flags(parser)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "weight-average.md", help="Markdown file")
    add_benchmarks_flags(parser)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "weight-average", help="tokenizers, data")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override a config field"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    budget_s = checked_budget(args)
    if any(not 0 < decay < 1 for decay in args.decays):
        raise GptlabError(f"--decays must lie between 0 and 1, got {' '.join(map(str, args.decays))}")
    preset = load_preset(args.preset)
    overrides = parse_overrides(args.overrides)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    recipe = prepare_recipe(preset, args.train_data, args.val_data, args.work_dir, args.test_data)
    experiment = f"{preset.name}-s{args.seed}"
    values = {
        **preset.values, **overrides, "ema_decay": None, "time_budget": budget_s, "seed": args.seed,
        "experiment_name": experiment, "log_dir": str(args.work_dir / "runs"),
        "checkpoint_dir": str(args.work_dir / "checkpoints" / experiment), "device": args.device,
    }  # fmt: skip
    model_cfg, data_cfg, train_cfg = build_configs(values)
    print(f"[{experiment}] training for {budget_s:g} s, averages of decay {args.decays}", flush=True)
    trainer = AveragingTrainer(
        args.decays, model_cfg, data_cfg, train_cfg, recipe.tokenizer, recipe.train_tokens, recipe.val_tokens,
        progress=not args.no_progress,
    )  # fmt: skip
    result = trainer.run()
    model, seq_len = trainer.plain_model, trainer.model_cfg.seq_len
    texts = [TokenDataset(tokens, seq_len) for tokens in (recipe.val_tokens, recipe.test_tokens)]

    def bits_per_byte() -> tuple[float, float]:
        val, test = (evaluate(model, text, data_cfg.batch_size, device=args.device).bits_per_byte for text in texts)
        return val, test

    rows = [("the trained weights", *bits_per_byte())]
    for decay, average in trainer.averages.items():
        with average.applied():
            rows.append((f"average, decay {decay:g} ({average.current_decay():.4f} at the end)", *bits_per_byte()))
    shape = f"{trainer.model_cfg.num_layers} × {trainer.model_cfg.embed_dim}"
    text = report(rows, args, budget_s, f"{shape}, {result.steps:,} steps, {result.tokens_seen:,} tokens")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.report, text.encode("utf-8"))
    print(text)
    print(f"written to {args.report}")
    if args.benchmarks is not None:
        update_section(args.benchmarks, "weight-average", text)
        print(f"and into the weight-average section of {args.benchmarks}")
    return rows


def report(rows: list[tuple[str, float, float]], args: argparse.Namespace, budget_s: float, trained: str) -> str:
    lines = [
        f"## Weight average: which decay ({args.preset}, {describe_budget(budget_s)}, one run)",
        "",
        f"{command_line('weight_average.py')}, "
        f"{torch.get_num_threads()} threads, seed {args.seed}: one run ({trained}), every row evaluated on the "
        "whole validation and held-out texts once it was over. Δ is against the trained weights.",
        "",
        "| weights | val bpb | Δ | test bpb | Δ |",
        "|---|---:|---:|---:|---:|",
    ]
    trained_val, trained_test = rows[0][1], rows[0][2]
    for label, val, test in rows:
        lines.append(f"| {label} | {val:.4f} | {val - trained_val:+.4f} | {test:.4f} | {test - trained_test:+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(parser=build_parser(), run=run))
