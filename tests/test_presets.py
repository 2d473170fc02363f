"""Presets: every shipped config validates and trains two steps (shrunk), and names resolve or fail clearly."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.config import build_configs
from gptlab.errors import GptlabError
from gptlab.presets import PRESETS_DIR, TokenizerRecipe, list_presets, load_preset, resolve_config, suggest_fields
from gptlab.training import train

from data_files import SHAKESPEARE_TRAIN, SHAKESPEARE_VAL, read_text

SHIPPED = ["cpu-10min", "demo", "gpt2-124m", "gpu-1h", "nanogpt-char", "nanogpt-cpu"]
TEXT = "".join(f"{i} To be, or not to be, that is the question. Whether 'tis nobler.\n" for i in range(50))
# Small enough to take two steps in a second; every other field keeps the preset's value.
TINY_SHAPES = {"embed_dim": 32, "n_heads": 2, "num_layers": 2, "seq_len": 16, "batch_size": 4}

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_presets_are_listed():
    assert set(SHIPPED) <= set(list_presets())


@pytest.mark.parametrize("name", SHIPPED)
def test_preset_validates_and_trains_two_steps(name, tmp_path):
    preset = load_preset(name)
    model_cfg, data_cfg, train_cfg = build_configs(preset.values)  # the preset as shipped
    assert preset.name == name and preset.values["embed_dim"] == model_cfg.embed_dim

    values = {**preset.values, **TINY_SHAPES}
    if train_cfg.total_batch_tokens is not None:  # keep gradient accumulation, at the tiny shapes
        values["total_batch_tokens"] = 2 * TINY_SHAPES["batch_size"] * TINY_SHAPES["seq_len"]
    values.update(
        max_steps=2,
        eval_interval=1,
        eval_batches=1,
        compile=False,
        device="cpu",
        log_dir=str(tmp_path / "runs"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    tiny_model, tiny_data, tiny_train = build_configs(values)
    kept = ("pos_encoding", "norm", "activation", "dropout", "bias", "tie_embeddings", "tgt_vocab_size")
    assert all(getattr(tiny_model, f) == getattr(model_cfg, f) for f in kept)
    assert tiny_train.optimizer == train_cfg.optimizer and tiny_train.learning_rate == train_cfg.learning_rate

    recipe = preset.tokenizer or TokenizerRecipe(kind="char")
    if recipe.vocab_size is not None:
        recipe = TokenizerRecipe(recipe.kind, vocab_size=280, pattern=recipe.pattern)  # a tiny corpus's worth
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "val.txt").write_text(TEXT[:800])
    result = train(
        tiny_model,
        tiny_data,
        tiny_train,
        recipe.train([TEXT]),
        tmp_path / "train.txt",
        tmp_path / "val.txt",
        progress=False,
    )
    assert result.steps == 2 and result.stopped_reason == "max_steps"
    assert result.eval is not None and 0 < result.eval.bits_per_byte < 20
    assert result.final_checkpoint.exists()


def test_nanogpt_cpu_is_the_recipe_nanogpts_readme_gives_cpu_users_and_trains_at_its_own_shapes(tmp_path):
    preset = load_preset("nanogpt-cpu")
    model_cfg, data_cfg, train_cfg = build_configs(preset.values)
    # --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0, and the
    # defaults of train_shakespeare_char.py (lr 1e-3, min_lr 1e-4, beta2 0.99, warmup 100) and train.py.
    assert (model_cfg.seq_len, data_cfg.batch_size, model_cfg.num_layers, model_cfg.n_heads) == (64, 12, 4, 4)
    assert (model_cfg.embed_dim, model_cfg.dropout, model_cfg.bias, model_cfg.expansion_factor) == (128, 0.0, False, 4)
    assert (model_cfg.pos_encoding, model_cfg.norm, model_cfg.activation) == ("learned", "layernorm", "gelu")
    assert model_cfg.tie_embeddings and preset.tokenizer == TokenizerRecipe(kind="char")
    assert (train_cfg.learning_rate, train_cfg.learning_rate * train_cfg.min_lr_ratio) == pytest.approx((1e-3, 1e-4))
    assert (train_cfg.beta1, train_cfg.beta2, train_cfg.weight_decay, train_cfg.grad_clip) == (0.9, 0.99, 0.1, 1.0)
    assert (train_cfg.warmup_steps, train_cfg.dtype, train_cfg.optimizer) == (100, "fp32", "adamw")

    values = {**preset.values, "max_steps": 2, "eval_interval": 1, "eval_batches": 1, "device": "cpu",
              "log_dir": str(tmp_path / "runs"), "checkpoint_dir": str(tmp_path / "ckpt")}  # fmt: skip
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "val.txt").write_text(TEXT[:800])
    result = train(
        *build_configs(values),
        preset.tokenizer.train([TEXT]),
        tmp_path / "train.txt",
        tmp_path / "val.txt",
        progress=False,
    )
    assert result.steps == 2 and result.stopped_reason == "max_steps" and result.final_checkpoint.exists()
    assert 0 < result.eval.bits_per_byte < 20


def test_presets_name_their_tokenizer():
    assert load_preset("nanogpt-char").tokenizer == TokenizerRecipe(kind="char")
    bpe = load_preset("cpu-10min").tokenizer
    assert bpe is not None and bpe.kind == "default" and bpe.vocab_size
    assert load_preset("demo").tokenizer is None


def test_training_a_preset_without_a_tokenizer_prints_the_command_that_trains_its_own(tmp_path, capsys, monkeypatch):
    from gptlab.cli import main

    (tmp_path / "t.txt").write_text(TEXT)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "nanogpt-char", "--train_data", "t.txt"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--tokenizer is required" in error
    command = error.split("`")[1]
    assert command == "gptlab tokenizer train t.txt --type char --out tokenizer-nanogpt-char"
    assert main(command.split()[1:]) == 0  # the command works as printed
    assert (tmp_path / "tokenizer-nanogpt-char").is_dir()


def test_a_recipe_spells_its_training_command():
    assert TokenizerRecipe("default", 4096).train_command("a.txt", "tok") == (
        "gptlab tokenizer train a.txt --vocab_size 4096 --out tok"
    )
    assert TokenizerRecipe("default", 512, "gpt2").train_command("a.txt", "t") == (
        "gptlab tokenizer train a.txt --vocab_size 512 --pattern gpt2 --out t"
    )
    assert (
        TokenizerRecipe("sentencepiece", 300)
        .train_command("a.txt", "t")
        .startswith("gptlab tokenizer train a.txt --type sentencepiece --vocab_size 300")
    )


def test_names_and_paths_resolve(tmp_path, monkeypatch):
    expected = PRESETS_DIR / "cpu-10min.yaml"
    monkeypatch.chdir(tmp_path)  # preset names work from any directory
    assert resolve_config("cpu-10min") == expected
    assert resolve_config("cpu-10min.yaml") == expected
    assert resolve_config("configs/cpu-10min.yaml") == expected
    own = tmp_path / "mine.yaml"
    own.write_text("embed_dim: 64\nn_heads: 4\n")
    assert resolve_config(own) == own and load_preset(str(own)).values == {"embed_dim": 64, "n_heads": 4}


def test_an_unknown_preset_names_close_matches_and_all_presets():
    with pytest.raises(
        GptlabError, match=r"'cpu-10mn' is neither a file nor a preset; did you mean cpu-10min\b"
    ) as err:
        resolve_config("cpu-10mn")
    assert all(name in str(err.value) for name in SHIPPED) and "\n" not in str(err.value)
    with pytest.raises(GptlabError, match=r"neither a file nor a preset; presets: cpu-10min"):
        resolve_config("zzzzzz")


def test_unknown_fields_are_named_with_close_matches(tmp_path):
    assert suggest_fields(["embed_dm"]) == "embed_dm (did you mean embed_dim?)"
    assert suggest_fields(["learning_rat", "zzz"]) == "learning_rat (did you mean learning_rate?), zzz"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(GptlabError, match=r"unknown config field\(s\): num_layer \(did you mean num_layers\b"):
        load_preset(bad)


@pytest.mark.parametrize(
    ("tokenizer", "message"),
    [
        ("char", "must be a mapping with a type"),
        ("{type: tiktoken}", "cannot be trained; use one of default, sentencepiece, char"),
        ("{type: default}", "needs tokenizer.vocab_size"),
        ("{type: char, vocab_size: 100}", "remove tokenizer.vocab_size"),
        ("{type: default, vocab_size: 300, merges: 3}", "unknown tokenizer key"),
    ],
)
def test_bad_tokenizer_recipes(tmp_path, tokenizer, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"tokenizer: {tokenizer}\nembed_dim: 64\n")
    with pytest.raises(GptlabError, match=message):
        load_preset(bad)


# ---- benchmarks/speedrun.py: the presets raced against the clock ----------------------------------
SPEEDRUN = ROOT / "benchmarks" / "speedrun.py"
TINY_FLAGS = [f"--set={k}={v}" for k, v in {**TINY_SHAPES, "eval_interval": 3, "eval_batches": 1}.items()]


def load_script(path, monkeypatch):
    """Import a benchmarks/ script as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, path.stem, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_speedrun(monkeypatch):
    return load_script(SPEEDRUN, monkeypatch)


def assert_refused_in_one_line(main, tmp_path, capsys, flags, message):
    """main(flags) on a tiny text exits 1 with one `error: ...` line holding `message`."""
    (tmp_path / "t.txt").write_text(TEXT)
    data = ["--train_data", str(tmp_path / "t.txt"), "--val_data", str(tmp_path / "t.txt")]
    assert main([*data, "--work_dir", str(tmp_path / "w"), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "10x"], "cannot read duration '10x'"),
        (["--set", "embed_dim"], "write FIELD=VALUE"),
        (["--recipes", "nanogpt-cpu", "cpu-10mn"], "did you mean cpu-10min"),
    ],
)
def test_speedrun_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    assert_refused_in_one_line(load_speedrun(monkeypatch).main, tmp_path, capsys, flags, message)


@pytest.mark.slow
def test_speedrun_end_to_end_on_a_tiny_budget(tmp_path):
    (tmp_path / "train.txt").write_text(read_text(SHAKESPEARE_TRAIN, 20_000))
    (tmp_path / "val.txt").write_text(read_text(SHAKESPEARE_VAL, 3_000))
    report, plot = tmp_path / "docs" / "speedrun.md", tmp_path / "docs" / "speedrun.png"
    command = [
        sys.executable, str(SPEEDRUN), "--budget", "2s", "--seeds", "1", "2", "--no_progress",
        "--train_data", str(tmp_path / "train.txt"), "--val_data", str(tmp_path / "val.txt"),
        "--work_dir", str(tmp_path / "work"), "--report", str(report), "--plot", str(plot), *TINY_FLAGS,
        "--benchmarks", str(tmp_path / "BENCHMARKS.md"),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| nanogpt-cpu | ", "| cpu-10min | "))]
    assert len(rows) == 4 + 2  # a row per run, then one per recipe
    assert all("time_budget" in row for row in rows[:4])
    assert "lower validation bits per byte than **nanogpt-cpu**" in text and "2.162" in text and "![" in text
    assert text.count("```text") == 4
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert section.startswith("<!-- speedrun:start -->\n## Speedrun") and "](docs/speedrun.png)" in section


# ---- benchmarks/ablation.py: one change at a time ------------------------------------------------
ABLATION = ROOT / "benchmarks" / "ablation.py"


def load_ablation(monkeypatch):
    load_speedrun(monkeypatch)  # ablation.py imports it by name
    return load_script(ABLATION, monkeypatch)


def test_every_ablation_walk_starts_and_changes_into_valid_configs(monkeypatch):
    ablation = load_ablation(monkeypatch)  # a misspelt field would otherwise surface after a 10-minute row
    for walk in ablation.WALKS.values():
        start = ablation.apply(load_preset(walk.base), ablation.Change("", walk.base_values, walk.base_tokenizer))
        build_configs(start.values)
        for change in walk.changes:
            build_configs(ablation.apply(start, change).values)


def test_ablation_keeps_a_change_only_when_it_lowers_bits_per_byte(tmp_path, monkeypatch):
    ablation = load_ablation(monkeypatch)
    baseline = tmp_path / "tiny.yaml"  # a learning rate too small to learn anything in the budget
    baseline.write_text(
        "tokenizer:\n  type: char\nmodel: {embed_dim: 32, n_heads: 2, num_layers: 1, seq_len: 16, dropout: 0.0}\n"
        "data: {batch_size: 8}\ntrain: {epochs: 1000, warmup_steps: 2, learning_rate: 1.0e-7, eval_interval: 50, "
        "eval_batches: 1}\n"
    )
    changes = [
        ablation.Change("a learning rate that learns", {"learning_rate": 0.01}),
        ablation.Change("back to one that does not", {"learning_rate": 1e-7}),
        ablation.Change("a byte-level BPE", tokenizer=TokenizerRecipe("default", 300)),
    ]
    walk = ablation.Walk("a test", str(baseline), {"warmup_steps": 1}, changes, "ablation-test")
    monkeypatch.setattr(ablation, "WALKS", {"test": walk})
    (tmp_path / "t.txt").write_text(TEXT * 4)
    report, benchmarks = tmp_path / "ablation.md", tmp_path / "BENCHMARKS.md"
    benchmarks.write_text("# Benchmarks\n\nnotes kept\n")
    args = ["--walk", "test", "--budget", "2s", "--seeds", "1", "2", "--no_progress", "--train_data", str(tmp_path / "t.txt"), "--val_data",
            str(tmp_path / "t.txt"), "--work_dir", str(tmp_path / "w"), "--report", str(report),
            "--benchmarks", str(benchmarks)]  # fmt: skip

    rows = ablation.run(ablation.build_parser().parse_args(args))

    assert [row.kept for row in rows[:3]] == [True, True, False]
    assert rows[2].delta > 0
    # Every row is measured against the last kept one: row 3 against row 1, not the dropped row 2.
    assert rows[3].delta == pytest.approx(rows[3].bpb - rows[1].bpb)
    assert rows[3].runs[0].params != rows[1].runs[0].params  # trained with the BPE's vocabulary
    assert [run.seed for run in rows[0].runs] == [1, 2]
    assert rows[0].bpb == pytest.approx((rows[0].runs[0].bpb + rows[0].runs[1].bpb) / 2)
    text = report.read_text()
    assert text.count("| no |") == 1 + (not rows[3].kept)
    kept_line = text.splitlines()[-1]
    assert "learning_rate=0.01" in kept_line  # the kept change, not the dropped one
    assert "warmup_steps=1" in kept_line  # the walk's start values
    assert (
        benchmarks.read_text()
        == f"# Benchmarks\n\nnotes kept\n\n<!-- ablation-test:start -->\n{text}<!-- ablation-test:end -->\n"
    )


# ---- benchmarks/weight_average.py: averages of one run, paired -----------------------------------
WEIGHT_AVERAGE = ROOT / "benchmarks" / "weight_average.py"


def load_weight_average(monkeypatch):
    load_speedrun(monkeypatch)  # weight_average.py imports it by name
    return load_script(WEIGHT_AVERAGE, monkeypatch)


def test_weight_average_refuses_a_decay_outside_0_to_1_in_one_line(tmp_path, capsys, monkeypatch):
    script = load_weight_average(monkeypatch)
    main = functools.partial(script.main, parser=script.build_parser(), run=script.run)
    assert_refused_in_one_line(main, tmp_path, capsys, ["--decays", "0.9", "1.5"], "--decays must lie between 0 and 1")


def test_weight_average_evaluates_the_trained_weights_and_each_average_of_one_run(tmp_path, monkeypatch):
    script = load_weight_average(monkeypatch)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        "tokenizer:\n  type: char\nmodel: {embed_dim: 32, n_heads: 2, num_layers: 1, seq_len: 16, dropout: 0.0}\n"
        "data: {batch_size: 8}\ntrain: {epochs: 1000, warmup_steps: 2, learning_rate: 0.01, eval_interval: 50, "
        "eval_batches: 1, ema_decay: 0.5}\n"
    )
    (tmp_path / "t.txt").write_text(TEXT * 4)
    report = tmp_path / "w.md"
    args = ["--preset", str(preset), "--budget", "2s", "--decays", "1e-7", "0.9", "--no_progress",
            "--train_data", str(tmp_path / "t.txt"), "--val_data", str(tmp_path / "t.txt"), "--test_data",
            str(tmp_path / "t.txt"), "--work_dir", str(tmp_path / "w"), "--report", str(report), "--no_benchmarks"]  # fmt: skip

    rows = script.run(script.build_parser().parse_args(args))

    (_, trained_val, trained_test), (_, near_zero_val, _), (_, averaged_val, averaged_test) = rows
    assert trained_val == trained_test  # the same text twice
    assert near_zero_val == pytest.approx(trained_val, abs=1e-4)  # an average that forgets at once is the weights
    assert averaged_val != pytest.approx(trained_val, abs=1e-4)  # one that remembers is not
    assert averaged_val == averaged_test
    table = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 and table[1].startswith("| the trained weights | ")
    assert "average, decay 0.9 (" in table[3]


def test_a_marked_section_is_replaced_and_everything_around_it_kept(tmp_path, monkeypatch):
    update_section = load_speedrun(monkeypatch).update_section
    path = tmp_path / "B.md"
    update_section(path, "run", "## First\n")
    assert path.read_text() == "<!-- run:start -->\n## First\n<!-- run:end -->\n"
    path.write_text("intro\n" + path.read_text() + "\nnotes after\n")
    update_section(path, "run", "## Second")
    update_section(path, "other", "## Other")
    assert path.read_text() == (
        "intro\n<!-- run:start -->\n## Second\n<!-- run:end -->\n\nnotes after\n\n"
        "<!-- other:start -->\n## Other\n<!-- other:end -->\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"), [(["--budget", "10x"], "cannot read duration"), (["--rows", "-1"], "--rows")]
)
def test_ablation_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, flags, message):
    assert_refused_in_one_line(load_ablation(monkeypatch).main, tmp_path, capsys, flags, message)


def test_presets_ship_inside_the_package():
    """So that a wheel (`pip install .`, not only `-e .`) has them: the package data covers them."""
    import gptlab

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    package = Path(gptlab.__file__).parent
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gptlab"]
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    presets = {p.resolve() for p in PRESETS_DIR.iterdir()}
    assert presets and presets <= {p.resolve() for p in shipped}
    assert (ROOT / "configs" / "cpu-10min.yaml").resolve() == PRESETS_DIR / "cpu-10min.yaml"  # the link at the root
