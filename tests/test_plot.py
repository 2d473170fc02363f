"""`gptlab plot`: curves read back from the TensorBoard logs of tiny real runs, drawn to an image."""

from __future__ import annotations

import argparse

import pytest

from gptlab.cli import main
from gptlab.cli.plot import add_plot_parser
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.plot import draw_curves, plot_runs, read_curve
from gptlab.tokenizers import CharTokenizer
from gptlab.training import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(80))  # 4.4 KB


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs (6 steps, evaluated every 2) logged under one runs/ directory."""
    root = tmp_path_factory.mktemp("plot")
    (root / "train.txt").write_text(TEXT)
    (root / "val.txt").write_text(TEXT[:1500])
    tokenizer = CharTokenizer.train([TEXT])
    for name, seed in (("alpha", 1), ("beta", 2)):
        train(
            ModelConfig(embed_dim=16, num_layers=1, n_heads=2, seq_len=16, dropout=0.0),
            DatasetConfig(batch_size=4),
            TrainConfig(
                max_steps=6,
                eval_interval=2,
                eval_batches=2,
                warmup_steps=1,
                learning_rate=3e-3,
                seed=seed,
                experiment_name=name,
                checkpoint_dir=str(root / "ckpt"),
                log_dir=str(root / "runs"),
                device="cpu",
            ),
            tokenizer,
            root / "train.txt",
            root / "val.txt",
            progress=False,
        )
    return root / "runs"


def test_curves_hold_the_logged_evaluations(runs):
    by_step = read_curve(runs / "alpha", "val/bpb", x="step")
    assert by_step.label == "alpha" and by_step.xs == [2.0, 4.0, 6.0]
    assert all(0 < y < 10 for y in by_step.ys)
    by_time = read_curve(runs / "alpha", "val/bpb", x="time")
    assert by_time.ys == by_step.ys
    assert all(0 <= a <= b for a, b in zip(by_time.xs, by_time.xs[1:]))  # seconds since the start, in order
    assert len(read_curve(runs / "beta", "train/loss").xs) == 6  # one training loss per step


def test_plot_writes_a_png_with_one_line_per_run(runs, tmp_path):
    out = tmp_path / "figs" / "bpb.png"
    curves = plot_runs([runs / "alpha", runs / "beta"], out, metric="val/loss", x="time")
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 1000
    assert [c.label for c in curves] == ["alpha", "beta"]
    figure = draw_curves(curves, x="time")
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2
    assert [list(line.get_ydata()) for line in lines] == [c.ys for c in curves]


def test_the_command_line(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_plot_parser(parser.add_subparsers())
    out = tmp_path / "loss.svg"
    args = parser.parse_args(["plot", str(runs / "alpha"), "--out", str(out), "--metric", "train/loss"])
    args.handler(args)
    assert out.read_text().lstrip().startswith("<?xml") and "alpha" in capsys.readouterr().out


def test_bad_input_is_one_clear_error(runs, tmp_path):
    with pytest.raises(GptlabError, match=r"no 'val/bpc'.*val/bpb, val/loss"):
        read_curve(runs / "alpha", "val/bpc")
    with pytest.raises(GptlabError, match="holds no TensorBoard event files; it holds the runs .*alpha"):
        read_curve(runs, "val/bpb")  # the parent of the runs, not a run
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="holds no TensorBoard event files; train into it first"):
        plot_runs([tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(GptlabError, match="not found"):
        plot_runs([tmp_path / "missing"], tmp_path / "x.png")
    with pytest.raises(GptlabError, match="image format"):
        plot_runs([runs / "alpha"], tmp_path / "x.gif")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("where", ["under_a_file", "onto_a_directory"])
def test_an_unwritable_out_is_one_line_on_the_command_line(runs, tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.png").mkdir()
    out = tmp_path / ("afile/x.png" if where == "under_a_file" else "d.png")
    assert main(["plot", str(runs / "alpha"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.png"]  # no temporary left
