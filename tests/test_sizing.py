"""Sizing a model to its time budget (training/sizing.py): the ladder of smaller models; the
choice of the largest whose measured speed shows it enough tokens per parameter; a trainer that
trains the chosen size exactly as a config naming it would, takes the timing from the budget,
keeps the size on resume, and refuses what cannot be sized with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gptlab.training.sizing as sizing
import gptlab.training.trainer as trainer_module
from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.tokenizers import load_tokenizer
from gptlab.training import load_checkpoint, train
from gptlab.training.sizing import TimedOn, ladder, learning_rate_for, shape, size_to_budget

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
# Four rungs: 6 x 128, 4 x 128, 4 x 96, 4 x 64.
SIZED = dict(
    embed_dim=128, num_layers=6, n_heads=2, seq_len=16, dropout=0.1, tgt_vocab_size=384
)  # the tiny tokenizer's


def test_the_ladder_keeps_value_embeddings_where_the_layers_can_take_them():
    preset = ModelConfig(embed_dim=256, num_layers=6, n_heads=4, value_embeddings=3)
    assert [cfg.value_embeddings for cfg in ladder(preset)] == [3, 2, 2, 2, 2, 2]


def test_the_ladder_takes_layers_then_width_and_keeps_heads_whole_and_even():
    preset = ModelConfig(embed_dim=256, num_layers=6, n_heads=4, pos_encoding="rope")
    assert [shape(cfg) for cfg in ladder(preset)] == ["6 x 256", "4 x 256", "4 x 192", "4 x 128", "4 x 96", "4 x 64"]
    gpt2 = ModelConfig(embed_dim=768, num_layers=12, n_heads=12)
    assert [shape(cfg) for cfg in ladder(gpt2)] == [
        "12 x 768",
        "8 x 768",
        "5 x 768",
        "4 x 768",
        "4 x 384",
        "4 x 192",
        "4 x 96",
    ]
    for cfg in ladder(gpt2):
        assert cfg.embed_dim % cfg.n_heads == 0 and cfg.head_dim % 2 == 0
        assert {**cfg.model_dump(), "num_layers": 0, "embed_dim": 0} == {
            **gpt2.model_dump(),
            "num_layers": 0,
            "embed_dim": 0,
        }  # nothing else changes
    assert ladder(ModelConfig(embed_dim=64, num_layers=2, n_heads=2)) == [
        ModelConfig(embed_dim=64, num_layers=2, n_heads=2)
    ]


def params(cfg: ModelConfig) -> int:
    return GPT(cfg).num_params()


def fake_speeds(monkeypatch, tokens_per_second) -> list[str]:
    """Replace the timing of steps by tokens_per_second(cfg); returns the shapes timed, in order."""
    timed = []

    def measure(cfg, *args):
        timed.append(shape(cfg))
        return tokens_per_second(cfg), params(cfg)

    monkeypatch.setattr(sizing, "measure", measure)
    return timed


def timed_on(train_cfg: TrainConfig, step_batch: int = 4) -> TimedOn:
    """A run's setting for fake timings (the data is never read)."""
    return TimedOn(DatasetConfig(), train_cfg, None, None, torch.device("cpu"), step_batch)


def choose(wanted: float, budget_s: float, max_steps: int = 10**9, step_batch: int = 4):
    cfg = ModelConfig(**SIZED)
    train_cfg = TrainConfig(time_budget=budget_s, size_to_budget=wanted)
    return size_to_budget(cfg, timed_on(train_cfg, step_batch), max_steps)


def test_the_largest_model_the_budget_shows_enough_tokens_per_parameter_is_chosen(monkeypatch):
    rungs = ladder(ModelConfig(**SIZED))
    # Each rung is fast enough for 0.5 tokens per parameter in 100 s, except the last two: 2.
    enough = {shape(cfg): (2.0 if i >= 2 else 0.5) * params(cfg) / 100 for i, cfg in enumerate(rungs)}
    timed = fake_speeds(monkeypatch, lambda cfg: enough[shape(cfg)])

    chosen = choose(wanted=1.0, budget_s=100)
    assert shape(chosen.model_cfg) == "4 x 96"
    assert timed == ["6 x 128", "4 x 128", "4 x 96"]  # the smaller ones are never timed
    assert "4 x 96 (the largest that reaches it" in chosen.notice and chosen.seconds >= 0

    timed.clear()
    chosen = choose(wanted=3.0, budget_s=100)  # none reaches 3: the smallest
    assert shape(chosen.model_cfg) == "4 x 64" and "none reaches it" in chosen.notice
    assert len(timed) == 4


def test_tokens_beyond_the_runs_epochs_do_not_count(monkeypatch):
    fake_speeds(monkeypatch, lambda cfg: 1e9)  # the budget would show every rung a billion tokens
    rungs = ladder(ModelConfig(**SIZED))
    run_tokens = 1000 * 4 * 16  # ... but the run ends after 1,000 steps of 4 windows of 16 tokens
    wanted = run_tokens / params(rungs[2])
    assert shape(choose(wanted, budget_s=100, max_steps=1000).model_cfg) == "4 x 96"
    assert shape(choose(wanted, budget_s=100).model_cfg) == "6 x 128"


def test_a_model_with_no_smaller_rung_is_not_timed(monkeypatch):
    timed = fake_speeds(monkeypatch, lambda cfg: pytest.fail("nothing to choose between"))
    cfg = ModelConfig(embed_dim=64, num_layers=2, n_heads=2)
    train_cfg = TrainConfig(time_budget=10, size_to_budget=1.0)
    chosen = size_to_budget(cfg, timed_on(train_cfg), 100)
    assert (chosen.model_cfg, chosen.seconds, timed) == (cfg, 0.0, [])


def test_timing_that_spends_the_whole_budget_is_refused(monkeypatch):
    def slow(cfg, *args):
        sizing.time.sleep(0.02)
        return 1e-12, params(cfg)

    monkeypatch.setattr(sizing, "measure", slow)
    with pytest.raises(GptlabError, match=r"timing 4 model sizes took .*s, all of time_budget 0.05s"):
        choose(wanted=1.0, budget_s=0.05)


def sized_run(tmp_path: Path, name: str, model: dict, resume=None, max_steps: int = 3, **train_settings):
    text = TRAIN_TEXT.read_text(encoding="utf-8")[:6_000]
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    settings = {
        "max_steps": max_steps, "epochs": 5, "learning_rate": 3e-3, "warmup_steps": 1, "eval_interval": 100,
        "experiment_name": name, "device": "cpu", "seed": 0, "checkpoint_dir": str(tmp_path / "ckpt"),
        "log_dir": str(tmp_path / "runs"),
    }  # fmt: skip
    return train(
        ModelConfig(**model),
        DatasetConfig(batch_size=4),
        TrainConfig(**{**settings, **train_settings}),
        load_tokenizer(None, TOKENIZER),
        tmp_path / "train.txt",
        progress=False,
        resume=resume,
    )


def pick_second_rung(monkeypatch) -> list[str]:
    """Speeds that make 4 x 128 the only rung to reach 1 token per parameter in a huge budget."""
    return fake_speeds(monkeypatch, lambda cfg: 1e-12 if cfg.num_layers == 6 else 1e9)


def test_a_sized_run_is_the_run_of_a_config_naming_that_size(tmp_path, monkeypatch, one_thread):
    pick_second_rung(monkeypatch)
    # max_steps (3) plans the schedule under a budget this long, so both runs are deterministic.
    sized = sized_run(tmp_path, "sized", SIZED, time_budget=1e6, size_to_budget=1e-9)
    named = sized_run(tmp_path, "named", {**SIZED, "num_layers": 4}, time_budget=1e6)

    sized_ckpt, named_ckpt = load_checkpoint(sized.final_checkpoint), load_checkpoint(named.final_checkpoint)
    assert sized_ckpt.model_config == named_ckpt.model_config
    assert shape(sized_ckpt.model_config) == "4 x 128"
    assert sized_ckpt.model_state.keys() == named_ckpt.model_state.keys()
    for key, value in sized_ckpt.model_state.items():
        assert torch.equal(value, named_ckpt.model_state[key]), key


def test_a_narrower_model_takes_the_adamw_rate_scaled_to_its_width(tmp_path, monkeypatch, one_thread):
    assert learning_rate_for(ModelConfig(**{**SIZED, "embed_dim": 64}), ModelConfig(**SIZED), 3e-3) == 6e-3
    assert learning_rate_for(ModelConfig(**{**SIZED, "num_layers": 4}), ModelConfig(**SIZED), 3e-3) == 3e-3
    fake_speeds(monkeypatch, lambda cfg: 1e9 if cfg.embed_dim == 64 else 1e-12)  # only 4 x 64 reaches it
    sized = sized_run(tmp_path, "sized", SIZED, time_budget=1e6, size_to_budget=1e-9)  # learning_rate 3e-3
    named = sized_run(
        tmp_path, "named", {**SIZED, "num_layers": 4, "embed_dim": 64}, time_budget=1e6, learning_rate=6e-3
    )

    sized_ckpt, named_ckpt = load_checkpoint(sized.final_checkpoint), load_checkpoint(named.final_checkpoint)
    assert shape(sized_ckpt.model_config) == "4 x 64" and sized_ckpt.train_config.learning_rate == 6e-3
    for key, value in sized_ckpt.model_state.items():
        assert torch.equal(value, named_ckpt.model_state[key]), key

    resumed = sized_run(
        tmp_path, "sized", SIZED, resume=sized.final_checkpoint, max_steps=5, time_budget=1e6, size_to_budget=1e-9
    )
    assert load_checkpoint(resumed.final_checkpoint).train_config.learning_rate == 6e-3


def test_timing_is_spent_from_the_budget(tmp_path, monkeypatch, one_thread):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    settings = dict(time_budget=60.0, size_to_budget=1e-9, device="cpu", log_dir=str(tmp_path / "runs"))
    trainer = trainer_module.Trainer(
        ModelConfig(**SIZED),
        DatasetConfig(batch_size=4),
        TrainConfig(**settings),
        load_tokenizer(None, TOKENIZER),
        tmp_path / "train.txt",
        progress=False,
    )
    assert trainer.sizing_seconds > 0  # the real timing of 6 x 128, which reaches 1e-9 per parameter
    assert shape(trainer.model_cfg) == "6 x 128"
    assert trainer.budget.budget_s == pytest.approx(60.0 - trainer.sizing_seconds)
    assert any(notice.startswith("--size_to_budget 1e-09 tokens per parameter: 6 x 128") for notice in trainer.notices)


def test_real_timing_measures_a_step_of_the_model(tmp_path, one_thread):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    tokenizer = load_tokenizer(None, TOKENIZER)
    cfg = ModelConfig(**{**SIZED, "tgt_vocab_size": tokenizer.vocab_size})
    data_cfg, train_cfg = DatasetConfig(batch_size=4), TrainConfig(optimizer="muon")
    from gptlab.training.tasks import task_for

    train_set = task_for(cfg, data_cfg, train_cfg, tokenizer).load_dataset(tmp_path / "train.txt", False)
    rate, count = sizing.measure(cfg, TimedOn(data_cfg, train_cfg, tokenizer, train_set, torch.device("cpu"), 4))
    assert count == params(cfg)
    assert 0 < rate < 10**8  # tokens per second of real steps of 4 x 16 tokens (on any machine, however loaded)


def test_a_resumed_run_keeps_its_size_and_refuses_one_not_on_the_ladder(tmp_path, monkeypatch, one_thread):
    pick_second_rung(monkeypatch)
    first = sized_run(tmp_path, "sized", SIZED, time_budget=1e6, size_to_budget=1e-9)

    timed = fake_speeds(monkeypatch, lambda cfg: pytest.fail("a resumed run must not be sized again"))
    resumed = sized_run(
        tmp_path, "sized", SIZED, resume=first.final_checkpoint, max_steps=5, time_budget=1e6, size_to_budget=1e-9
    )
    assert timed == [] and resumed.steps == 5
    assert shape(load_checkpoint(resumed.final_checkpoint).model_config) == "4 x 128"

    other = sized_run(tmp_path, "other", {**SIZED, "num_layers": 1, "embed_dim": 32})
    with pytest.raises(GptlabError, match=r"holds a 1 x 32 model, not one that --size_to_budget picks"):
        sized_run(tmp_path, "sized", SIZED, resume=other.final_checkpoint, time_budget=1e6, size_to_budget=1e-9)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"size_to_budget": 1.0}, "size_to_budget needs a time budget"),
        ({"size_to_budget": 1.0, "time_budget": 60, "init_weights": True}, "--init_from fixes the size"),
    ],
)
def test_what_cannot_be_sized_is_refused(tmp_path, settings, message, one_thread):
    settings = dict(settings)
    init_weights = GPT(ModelConfig(**SIZED)).state_dict() if settings.pop("init_weights", False) else None
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    with pytest.raises(GptlabError, match=message):
        train(
            ModelConfig(**SIZED),
            DatasetConfig(batch_size=4),
            TrainConfig(device="cpu", log_dir=str(tmp_path / "runs"), checkpoint_dir=str(tmp_path), **settings),
            load_tokenizer(None, TOKENIZER),
            tmp_path / "train.txt",
            progress=False,
            init_weights=init_weights,
        )


def test_the_command_line_refuses_sizing_without_a_budget_in_one_line(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:6_000], encoding="utf-8")
    argv = ["train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp_path / "train.txt")]
    argv += ["--size_to_budget", "1", "--checkpoint_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "runs")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "size_to_budget needs a time budget (--time_budget)" in err
    assert not (tmp_path / "ckpt").exists()
