"""--ema_decay: the average's arithmetic, a run that keeps one trains exactly the weights of a run
that does not, evaluates and saves the average, and resumes exactly; the settings it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gptlab.cli import main
from gptlab.data import TokenDataset, resolve_data
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.training import load_checkpoint
from gptlab.training.metrics import evaluate
from gptlab.training.run_files import find_latest, read_step_log
from gptlab.training.weight_average import EXTRA_KEY, WeightAverage

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
STEPS = 40


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # one parameter, two names


def test_the_average_moves_a_warmed_up_share_of_the_way_each_update() -> None:
    model = Tied()
    average = WeightAverage(model, decay=0.9)
    expected = model.embed.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model.embed.weight.add_(torch.randn_like(model.embed.weight))
        average.update()
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * model.embed.weight.detach()
    torch.testing.assert_close(average.average[0], expected)
    extra: dict = {}
    saved = average.checkpoint_state(model.state_dict(), extra)
    assert torch.equal(saved["embed.weight"], saved["head.weight"])  # both names hold the average
    assert torch.equal(saved["embed.weight"], average.average[0])
    assert torch.equal(extra[EXTRA_KEY]["trained"]["head.weight"], model.embed.weight)
    assert extra[EXTRA_KEY]["updates"] == 30


def test_applied_puts_the_trained_weights_back_even_after_an_error() -> None:
    model = Tied()
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.embed.weight.mul_(3)
    trained = model.embed.weight.detach().clone()
    with pytest.raises(RuntimeError), average.applied():
        assert torch.equal(model.head.weight, average.average[0])
        raise RuntimeError("evaluation failed")
    assert torch.equal(model.embed.weight, trained)


def train_args(tmp: Path, run: str, *extra: str) -> list[str]:
    return [
        "train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp / "train.txt"),
        "--eval_data", str(tmp / "val.txt"), "--eval_interval", "7", "--eval_batches", "2",
        "--embed_dim", "32", "--num_layers", "2", "--n_heads", "2", "--seq_len", "16", "--batch_size", "4",
        "--dropout", "0.1", "--max_steps", str(STEPS), "--device", "cpu", "--experiment_name", "exp",
        "--checkpoint_dir", str(tmp / run), "--log_dir", str(tmp / run / "runs"), "--no_progress", *extra,
    ]  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    text = TRAIN_TEXT.read_text(encoding="utf-8")
    (tmp_path / "train.txt").write_text(text[:8_000], encoding="utf-8")
    (tmp_path / "val.txt").write_text(text[8_000:10_000], encoding="utf-8")
    return tmp_path


def test_a_run_keeping_an_average_trains_the_same_weights_and_saves_and_evaluates_the_average(
    workdir: Path, capsys
) -> None:
    assert main(train_args(workdir, "plain")) == 0
    capsys.readouterr()
    assert main(train_args(workdir, "ema", "--ema_decay", "0.9")) == 0
    last_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"step {STEPS}/")][-1]

    plain = load_checkpoint(find_latest(workdir / "plain", "exp"))
    ema = load_checkpoint(find_latest(workdir / "ema", "exp"))
    # Evaluating the average in between (every 7 steps) never disturbed the weights being trained.
    losses = [e["loss"] for e in read_step_log(workdir / "plain" / "runs" / "exp" / "metrics.jsonl")]
    assert [e["loss"] for e in read_step_log(workdir / "ema" / "runs" / "exp" / "metrics.jsonl")] == losses
    trained = ema.extra[EXTRA_KEY]["trained"]
    assert ema.extra[EXTRA_KEY]["updates"] == STEPS
    for name, tensor in plain.model_state.items():
        assert torch.equal(trained[name], tensor), name
    assert not torch.equal(ema.model_state["lm_head.weight"], trained["lm_head.weight"])  # the model is the average

    # The run's last evaluation was of the average: the checkpoint's model gives the same loss.
    model = GPT(ema.model_config)
    model.load_state_dict(ema.model_state)
    val = TokenDataset(resolve_data(workdir / "val.txt", ema.tokenizer, progress=False), ema.model_config.seq_len)
    result = evaluate(model, val, batch_size=4, max_batches=2)
    assert f"val loss {result.loss:.4f}" in last_line


def test_a_run_keeping_an_average_resumes_exactly(workdir: Path) -> None:
    assert main(train_args(workdir, "whole", "--ema_decay", "0.9")) == 0
    assert main(train_args(workdir, "parts", "--ema_decay", "0.9", "--max_steps", "23")) == 0
    assert main(train_args(workdir, "parts", "--ema_decay", "0.9", "--resume", "auto")) == 0
    whole = load_checkpoint(find_latest(workdir / "whole", "exp"))
    parts = load_checkpoint(find_latest(workdir / "parts", "exp"))
    assert parts.step == whole.step == STEPS
    for name, tensor in whole.model_state.items():
        assert torch.equal(parts.model_state[name], tensor), name
    for name, tensor in whole.extra[EXTRA_KEY]["trained"].items():
        assert torch.equal(parts.extra[EXTRA_KEY]["trained"][name], tensor), name


def test_a_run_without_an_average_resumes_the_trained_weights_not_the_average(workdir: Path) -> None:
    assert main(train_args(workdir, "plain")) == 0
    assert main(train_args(workdir, "parts", "--ema_decay", "0.9", "--max_steps", "23")) == 0
    assert main(train_args(workdir, "parts", "--resume", "auto")) == 0  # the rest without --ema_decay
    plain = load_checkpoint(find_latest(workdir / "plain", "exp"))
    parts = load_checkpoint(find_latest(workdir / "parts", "exp"))
    assert EXTRA_KEY not in parts.extra
    for name, tensor in plain.model_state.items():
        assert torch.equal(parts.model_state[name], tensor), name


def test_settings_it_cannot_keep_an_average_with_are_refused_in_one_line(workdir: Path, capsys) -> None:
    assert main(train_args(workdir, "bad", "--ema_decay", "1")) != 0
    err = capsys.readouterr().err.strip()
    assert "ema_decay" in err and len(err.splitlines()) == 1, err

    assert main(train_args(workdir, "base", "--max_steps", "2")) == 0
    base = find_latest(workdir / "base", "exp")
    lora = train_args(workdir, "bad", "--ema_decay", "0.9", "--lora_rank", "2", "--init_from", str(base))
    del lora[1:3]  # --tokenizer: the base brings its own
    capsys.readouterr()
    assert main(lora) != 0
    err = capsys.readouterr().err.strip()
    assert "--ema_decay averages every weight" in err and len(err.splitlines()) == 1, err
    assert not list((workdir / "bad").glob("*.pth"))


def test_the_refusal_names_fsdp_too() -> None:
    from gptlab.config import TrainConfig
    from gptlab.training.weight_average import refuse_average_with

    with pytest.raises(GptlabError, match="drop --fsdp"):
        refuse_average_with(TrainConfig(ema_decay=0.9), fsdp=True)


def test_a_checkpoint_with_a_damaged_average_is_refused_in_one_line(workdir: Path, capsys) -> None:
    assert main(train_args(workdir, "parts", "--ema_decay", "0.9", "--max_steps", "5")) == 0
    path = find_latest(workdir / "parts", "exp")
    raw = torch.load(path, weights_only=True)
    raw["extra"][EXTRA_KEY] = {"decay": 0.9}  # no trained weights
    torch.save(raw, path)
    capsys.readouterr()
    assert main(train_args(workdir, "parts", "--ema_decay", "0.9", "--resume", "auto")) != 0
    err = capsys.readouterr().err.strip()
    assert "damaged weight_average entry" in err and len(err.splitlines()) == 1, err
