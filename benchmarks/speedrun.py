"""Speedrun: how good a model each recipe trains in the same wall-clock budget, in bits per byte.

    python benchmarks/speedrun.py --budget 10m [--seeds 1 2] [--report docs/speedrun.md]

The first recipe is the baseline; by default (a) `nanogpt-cpu`, the Shakespeare-char recipe
nanoGPT's README gives CPU users, against (b) `cpu-10min`, ours. For each recipe, in this one process:
  - its tokenizer is trained on the training text (characters, or our BPE at the preset's
    vocabulary size) and both texts are tokenized: preprocessing, not counted in the budget;
then for each seed, one run after another:
  - training under --time_budget (the trainer excludes its evaluations from the budget);
  - the final model evaluated on the WHOLE validation text, in bits per byte, which compares
    models whatever their tokenizer (the last window shorter than seq_len is left out);
  - a 300-character sample.
Writes a Markdown section (the table: bpb, tokens/s, the model (layers × width, parameters), tokens seen; mean ± sd per
recipe; the relative bpb improvement of each recipe over the baseline; the samples) to --report
and into the marked speedrun section of --benchmarks (BENCHMARKS.md, unless --no_benchmarks), and
the validation bpb of every run against wall-clock seconds to --plot.
Tokenizers, token files, checkpoints and logs go under --work_dir (runs of the same name replaced).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab.config import SampleConfig, build_configs, parse_duration
from gptlab.data import TokenDataset, prepare
from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.generation import generate
from gptlab.plot import plot_runs, read_curve
from gptlab.presets import Preset, load_preset
from gptlab.tokenizers import Tokenizer, save_tokenizer
from gptlab.tokenizers.corpus import read_corpus
from gptlab.training import evaluate, load_model, train

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "data" / "shakespeare"
SAMPLE_CHARS = 300
SAMPLE_TEMPERATURE = 0.8
TARGET_IMPROVEMENT = 0.20  # what we aim for against nanoGPT's CPU recipe (issue 16)
# What the real programs behind a preset reach, measured outside this script, so that readers can
# check that the preset is faithful to them.
REFERENCES = {
    "nanogpt-cpu": (
        "real nanoGPT (train.py with the README's CPU flags) trained for 25,000 iterations (632 s on "
        "2 cores) on the same train.txt reaches **2.162** bits per byte on the whole val.txt "
        "(non-overlapping 64-character windows)"
    ),
}


@dataclass(frozen=True)
class Recipe:
    """A preset made ready to train: its config values, tokenizer and tokenized texts."""

    name: str
    preset: Preset
    tokenizer: Tokenizer
    train_tokens: Path
    val_tokens: Path
    test_tokens: Path | None = None  # the held-out text, evaluated once a run is over (never tuned on)


@dataclass(frozen=True)
class RunResult:
    """What one training run of one recipe gave."""

    recipe: str
    seed: int
    bpb: float
    tokens_per_s: float
    params: int
    shape: str  # layers x width of the model trained (a recipe sized to the budget picks its own)
    tokens_seen: int
    steps: int
    stopped: str
    sample: str
    log_dir: Path
    epochs: float  # passes over the training tokens
    best_seen: float  # the lowest bpb of the trainer's evaluations during the run (a validation sample) ...
    last_seen: float  # ... and its last one, on the same sample: far above best_seen means it overfitted
    test_bpb: float | None = None  # on the whole held-out text, when the recipe has one


def prepare_recipe(
    preset: Preset, train_text: Path, val_text: Path, work_dir: Path, test_text: Path | None = None
) -> Recipe:
    """Train the preset's tokenizer on the training text and tokenize the texts with it."""
    name = preset.name
    if preset.tokenizer is None:
        raise GptlabError(f"preset {name} names no tokenizer; add a `tokenizer:` mapping to {preset.path}")
    print(f"[{name}] training its tokenizer ({preset.tokenizer.describe()}) on {train_text}", flush=True)
    tokenizer = preset.tokenizer.train(read_corpus([train_text]))
    save_tokenizer(tokenizer, work_dir / "tokenizers" / name)
    data = work_dir / "data"
    return Recipe(
        name=name,
        preset=preset,
        tokenizer=tokenizer,
        train_tokens=prepare([train_text], tokenizer, data / f"{name}-train", progress=False),
        val_tokens=prepare([val_text], tokenizer, data / f"{name}-val", progress=False),
        test_tokens=None
        if test_text is None
        else prepare([test_text], tokenizer, data / f"{name}-test", progress=False),
    )


def run_once(
    recipe: Recipe, seed: int, budget_s: float, overrides: dict[str, str], work_dir: Path, device: str, progress: bool
) -> RunResult:
    """Train `recipe` for `budget_s` seconds with `seed`, then evaluate it on the whole validation text."""
    experiment = f"{recipe.name}-s{seed}"
    log_dir, checkpoint_dir = work_dir / "runs", work_dir / "checkpoints" / experiment
    for stale in (log_dir / experiment, checkpoint_dir):  # a plot must not mix in an earlier run's events
        shutil.rmtree(stale, ignore_errors=True)
    values = {
        **recipe.preset.values, **overrides, "time_budget": budget_s, "seed": seed, "experiment_name": experiment,
        "log_dir": str(log_dir), "checkpoint_dir": str(checkpoint_dir), "device": device,
    }  # fmt: skip
    model_cfg, data_cfg, train_cfg = build_configs(values)
    print(f"[{experiment}] training for {budget_s:g} s", flush=True)
    result = train(
        model_cfg, data_cfg, train_cfg, recipe.tokenizer, recipe.train_tokens, recipe.val_tokens, progress=progress
    )

    model, tokenizer, _ = load_model(result.final_checkpoint, device)

    def bits_per_byte(tokens: Path) -> float:
        whole = TokenDataset(tokens, model.config.seq_len)
        return evaluate(model, whole, batch_size=data_cfg.batch_size, device=device).bits_per_byte

    train_tokens = TokenDataset(recipe.train_tokens, model.config.seq_len).num_tokens
    sample_cfg = SampleConfig(max_new_tokens=SAMPLE_CHARS, temperature=SAMPLE_TEMPERATURE, seed=seed)
    sample = generate(model, tokenizer, "", sample_cfg, notice=lambda _: None)[0][:SAMPLE_CHARS]
    rates = read_curve(log_dir / experiment, "tokens_per_s")
    curve = read_curve(log_dir / experiment, "val/bpb")
    run = RunResult(
        recipe=recipe.name,
        seed=seed,
        bpb=bits_per_byte(recipe.val_tokens),
        tokens_per_s=training_rate(rates.xs, rates.ys),
        params=model.num_params(),
        shape=f"{model.config.num_layers} × {model.config.embed_dim}",
        tokens_seen=result.tokens_seen,
        steps=result.steps,
        stopped=result.stopped_reason,
        sample=sample,
        log_dir=log_dir / experiment,
        epochs=result.tokens_seen / train_tokens,
        best_seen=min(curve.ys),
        last_seen=curve.ys[-1],
        test_bpb=None if recipe.test_tokens is None else bits_per_byte(recipe.test_tokens),
    )
    print(
        f"[{experiment}] {run.steps} steps, {run.tokens_seen:,} tokens ({run.epochs:.1f} epochs), "
        f"val bpb {run.bpb:.4f} (the trainer's evaluations: best {run.best_seen:.4f}, last {run.last_seen:.4f})",
        flush=True,
    )
    return run


def optional(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def training_rate(steps: list[float], rates: list[float]) -> float:
    """Tokens/s over the whole run from the rate logged for each interval (ending at `steps`):
    total tokens / total seconds, i.e. the rates' harmonic mean weighted by steps per interval."""
    intervals = [b - a for a, b in zip([0.0, *steps], steps)]
    seconds = sum(n / r for n, r in zip(intervals, rates) if r > 0)
    return sum(n for n, r in zip(intervals, rates) if r > 0) / seconds if seconds else float("nan")


# ---- the report ----------------------------------------------------------------------------------
def mean_and_sd(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def describe_budget(budget_s: float) -> str:
    """600 -> '10 minutes', 90 -> '1.5 minutes', 20 -> '20 s'."""
    return f"{budget_s / 60:g} minutes" if budget_s >= 60 else f"{budget_s:g} s"


def update_section(path: Path, name: str, text: str) -> None:
    """Put `text` into the Markdown file `path` between the lines `<!-- name:start -->` and
    `<!-- name:end -->`, replacing what they held; the first time, append it with its markers.
    Everything else in the file stays as it is (notes written around the section survive)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old.split(start, 1)[1]:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    write_atomic(path, new.encode("utf-8"))


def command_line(script: str) -> str:
    """The start of a report: the command that wrote it, the date and torch's version."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:])
    return f"Command: `{command}`, run on {datetime.date.today()} with torch {torch.__version__}"


def report(runs: list[RunResult], args: argparse.Namespace, budget_s: float, image: str) -> str:
    """The Markdown section: setup, per-run table, per-recipe summary, improvement, plot, samples."""
    recipes = list(dict.fromkeys(r.recipe for r in runs))
    by_recipe = {name: [r.bpb for r in runs if r.recipe == name] for name in recipes}
    lines = [
        f"## Speedrun: {describe_budget(budget_s)} of training per run",
        "",
        f"{command_line('speedrun.py')} on "
        f"{platform.machine()} ({os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads), device "
        f"{args.device}. Training text: {args.train_data.name} ({args.train_data.stat().st_size / 1e6:.2f} MB); "
        f"validation: the whole of {args.val_data.name} ({args.val_data.stat().st_size / 1e3:.0f} KB). Each run trains "
        f"for {budget_s:g} s of wall-clock time (evaluations excluded); tokenizer training and tokenization "
        "are not counted. Bits per byte = total nats ÷ ln 2 ÷ UTF-8 bytes: lower is better, and comparable "
        "across tokenizers.",
        "",
        "| recipe | seed | val bpb | best / last seen | test bpb | tokens/s | model | tokens seen | epochs "
        "| steps | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r.recipe} | {r.seed} | {r.bpb:.4f} | {r.best_seen:.4f} / {r.last_seen:.4f} | {optional(r.test_bpb)} | "
        f"{r.tokens_per_s:,.0f} | {r.shape}, {r.params / 1e6:.2f}M | {r.tokens_seen:,} | {r.epochs:.1f} | {r.steps} | {r.stopped} |"
        for r in runs
    ]
    lines += [
        "",
        "| recipe | runs | val bpb (mean ± sd) | best | worst | test bpb (mean ± sd) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, bpbs in by_recipe.items():
        tests = [r.test_bpb for r in runs if r.recipe == name and r.test_bpb is not None]
        lines.append(
            f"| {name} | {len(bpbs)} | {mean_and_sd(bpbs)} | {min(bpbs):.4f} | {max(bpbs):.4f} | "
            f"{mean_and_sd(tests) if tests else '–'} |"
        )
    baseline = statistics.fmean(by_recipe[recipes[0]])
    lines.append("")
    for name in recipes:
        if name in REFERENCES:
            lines += [f"Reference for **{name}**: {REFERENCES[name]}.", ""]
    for name in recipes[1:]:
        gain = (baseline - statistics.fmean(by_recipe[name])) / baseline
        verdict = "met" if gain >= TARGET_IMPROVEMENT else "not met"
        lines.append(
            f"**{name}** reaches {100 * gain:.1f}% lower validation bits per byte than **{recipes[0]}** "
            f"(mean over seeds; target ≥ {100 * TARGET_IMPROVEMENT:.0f}%: {verdict})."
        )
    lines += [
        "",
        f"![validation bits per byte against wall-clock seconds]({image})",
        "",
        'The curves are the trainer\'s evaluations on a sample of the validation text ("best / last seen" '
        "are their lowest and last points: a last far above the best means the run overfitted); wall-clock "
        "time includes those evaluations. The test text is held out: "
        "no recipe was tuned on it, and it is evaluated only here, once each run is over.",
        "",
        f"### Samples ({SAMPLE_CHARS} characters, temperature {SAMPLE_TEMPERATURE}, from an empty prompt)",
    ]
    for r in runs:
        lines += ["", f"{r.recipe}, seed {r.seed}:", "", "```text", r.sample, "```"]
    return "\n".join(lines) + "\n"


# ---- the command line ----------------------------------------------------------------------------
def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """['embed_dim=64', ...] -> {'embed_dim': '64'} (pydantic converts the strings)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise GptlabError(f"cannot read --set {pair!r}; write FIELD=VALUE, e.g. --set embed_dim=64")
        overrides[key.strip()] = value.strip()
    return overrides


def add_text_flags(parser: argparse.ArgumentParser) -> None:
    """--train_data, --val_data and --test_data: Shakespeare's three texts unless named."""
    parser.add_argument("--train_data", type=Path, default=SHAKESPEARE / "train.txt", help="training text")
    parser.add_argument("--val_data", type=Path, default=SHAKESPEARE / "val.txt", help="validation text")
    parser.add_argument("--test_data", type=Path, default=SHAKESPEARE / "test.txt", help="held-out text")


def add_benchmarks_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--benchmarks",
        type=Path,
        default=ROOT / "BENCHMARKS.md",
        help="also write the report into its marked section of this file (default: %(default)s)",
    )
    parser.add_argument(
        "--no_benchmarks", dest="benchmarks", action="store_const", const=None, help="leave BENCHMARKS.md alone"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", default="10m", help="training time per run: 600, 600s, 10m, 1h (default: %(default)s)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="seeds per recipe (default: 1 2)")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=["nanogpt-cpu", "cpu-10min"],
        help="presets to compare; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument("--train_data", type=Path, default=SHAKESPEARE / "train.txt", help="training text")
    parser.add_argument(
        "--val_data", type=Path, default=SHAKESPEARE / "val.txt", help="validation text, evaluated whole"
    )
    parser.add_argument(
        "--test_data",
        type=Path,
        default=SHAKESPEARE / "test.txt",
        help="held-out text, evaluated whole once each run is over; never tune on it (default: %(default)s)",
    )
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "speedrun.md", help="Markdown file to write")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "speedrun.png", help="PNG of bpb against seconds")
    add_benchmarks_flags(parser)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "speedrun", help="tokenizers, data, logs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field in every recipe, e.g. --set embed_dim=64 (for quick trials); repeatable",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser


def checked_budget(args: argparse.Namespace) -> float:
    """--budget in seconds, once --budget, --train_data and --val_data are checked (GptlabError if not)."""
    try:
        budget_s = parse_duration(args.budget)
    except ValueError as err:
        raise GptlabError(f"--budget: {err}") from None
    if budget_s <= 0:
        raise GptlabError(f"--budget must be positive, got {args.budget!r}")
    check_texts(args.train_data, args.val_data, getattr(args, "test_data", None))
    return budget_s


def check_texts(*paths: Path | None) -> None:
    """GptlabError, naming the flags that set them, if a given text is not a file."""
    for path in paths:
        if path is not None and not path.is_file():
            raise GptlabError(f"{path} not found; pass --train_data/--val_data/--test_data")


def run(args: argparse.Namespace) -> list[RunResult]:
    budget_s = checked_budget(args)
    overrides = parse_overrides(args.overrides)
    presets = [load_preset(name) for name in args.recipes]  # every name checked before any work
    args.work_dir.mkdir(parents=True, exist_ok=True)
    recipes = [
        prepare_recipe(preset, args.train_data, args.val_data, args.work_dir, args.test_data) for preset in presets
    ]
    runs = [
        run_once(recipe, seed, budget_s, overrides, args.work_dir, args.device, not args.no_progress)
        for recipe in recipes
        for seed in args.seeds
    ]
    plot_runs(
        [r.log_dir for r in runs],
        args.plot,
        metric="val/bpb",
        x="time",
        labels=[f"{r.recipe}, seed {r.seed}" for r in runs],
        title=f"Validation bits per byte, {args.budget} budget",
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    text = report(runs, args, budget_s, os.path.relpath(args.plot, args.report.parent))
    write_atomic(args.report, text.encode("utf-8"))
    print(text)
    print(f"written to {args.report} and {args.plot}")
    if args.benchmarks is not None:
        image = os.path.relpath(args.plot, args.benchmarks.resolve().parent)
        update_section(args.benchmarks, "speedrun", report(runs, args, budget_s, image))
        print(f"and into the speedrun section of {args.benchmarks}")
    return runs


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None, run=run) -> int:
    """Parse argv, run; a GptlabError is one line on stderr and exit status 1 (ablation.py shares this)."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        run(args)
    except GptlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
