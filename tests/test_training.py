"""The trainer end to end on tiny data: loss goes down, checkpoints and logs appear, and every
way of stopping (max_steps, time budget, Ctrl-C, nan loss) leaves the right files behind."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

import gptlab.training.tasks as tasks_module
import gptlab.training.trainer as trainer_module
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig, validated
from gptlab.data import TokenDataset, resolve_data
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.training import evaluate, load_checkpoint, load_model, train
from gptlab.training.stop_request import StopRequest

from helpers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py


LINES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "we like to read books.",
    "it is a sunny day.",
]


@pytest.fixture
def corpus(tmp_path):
    """Small, very regular train and eval text (the same sentences in different orders)."""
    train_text = "\n".join(LINES[(i * 7) % 4] for i in range(60)) + "\n"  # 1.3 KB: 6 batches of 16x16
    eval_text = "\n".join(LINES[(i * 3) % 4] for i in range(30)) + "\n"
    (tmp_path / "train.txt").write_text(train_text)
    (tmp_path / "eval.txt").write_text(eval_text)
    return tmp_path / "train.txt", tmp_path / "eval.txt"


def configs(tmp_path, **train):
    model = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=16, dropout=0.0)
    settings = {
        "epochs": 3, "learning_rate": 3e-3, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 2,
        "checkpoint_every": 2, "experiment_name": "tiny", "checkpoint_dir": str(tmp_path / "ckpt"),
        "log_dir": str(tmp_path / "runs"), "device": "cpu", "seed": 0,
    }  # fmt: skip
    return model, DatasetConfig(batch_size=16), TrainConfig(**{**settings, **train})


def run(tmp_path, corpus, eval_data=True, **train):
    model_cfg, data_cfg, train_cfg = configs(tmp_path, **train)
    return train_fn(model_cfg, data_cfg, train_cfg, corpus, eval_data)


def train_fn(model_cfg, data_cfg, train_cfg, corpus, eval_data=True):
    train_path, eval_path = corpus
    return train(
        model_cfg, data_cfg, train_cfg, ByteTokenizer(), train_path, eval_path if eval_data else None, progress=False
    )


def test_training_lowers_loss_and_writes_checkpoints_and_logs(tmp_path, corpus):
    result = run(tmp_path, corpus, epochs=5)
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.glob("*.pth")) == ["tiny_e2.pth", "tiny_e4.pth", "tiny_e5.pth"]
    assert result.final_checkpoint == ckpt / "tiny_e5.pth"
    assert result.stopped_reason == "completed" and result.epochs_completed == 5
    batches = load_checkpoint(ckpt / "tiny_e2.pth").step // 2
    assert result.steps == 5 * batches and result.tokens_seen > 0

    # The trained model predicts the eval text better than the same model untrained.
    torch.manual_seed(0)
    model_cfg = configs(tmp_path)[0].model_copy(update={"tgt_vocab_size": 260})
    eval_set = TokenDataset(resolve_data(corpus[1], ByteTokenizer(), progress=False), 16)
    untrained = evaluate(GPT(model_cfg), eval_set, batch_size=16)
    trained, _, checkpoint = load_model(result.final_checkpoint)
    after = evaluate(trained, eval_set, batch_size=16)
    assert after.loss < untrained.loss - 1.0
    assert result.eval is not None and result.eval.loss < untrained.loss - 1.0
    assert math.isclose(result.eval.bits_per_byte, result.eval.loss / math.log(2) / eval_set.bytes_per_token)
    assert result.train_loss < untrained.loss - 1.0
    assert checkpoint.model_config.tgt_vocab_size == 260  # filled in from the tokenizer

    logs = tmp_path / "runs" / "tiny"
    assert list(logs.glob("events.out.tfevents.*"))
    written = json.loads((logs / "config.json").read_text())
    assert written["train"]["epochs"] == 5 and written["model"]["tgt_vocab_size"] == 260
    assert written["data"]["batch_size"] == 16


def test_tensorboard_scalars(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, corpus, epochs=1)
    events = EventAccumulator(str(tmp_path / "runs" / "tiny"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/bpb", "lr", "tokens_per_s", "grad_norm"} <= tags
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == list(range(1, len(steps) + 1))


def test_max_steps_stops_at_that_step_mid_epoch(tmp_path, corpus):
    result = run(tmp_path, corpus, max_steps=3, eval_interval=100)
    assert (result.stopped_reason, result.steps, result.epochs_completed) == ("max_steps", 3, 0)
    checkpoint = load_checkpoint(result.final_checkpoint)
    assert result.final_checkpoint.name == "tiny_e1.pth"  # named for the epoch in progress
    assert (checkpoint.step, checkpoint.epoch, checkpoint.extra["epoch_batches_done"]) == (3, 1, 3)
    assert result.eval is not None  # a final evaluation of the model that was saved


def test_stop_on_the_last_batch_of_an_epoch_completes_it(tmp_path, corpus):
    result = run(tmp_path, corpus, max_steps=6, eval_data=False)  # 6 batches per epoch
    assert (result.stopped_reason, result.epochs_completed, result.final_checkpoint.name) == (
        "max_steps",
        1,
        "tiny_e1.pth",
    )


def test_time_budget_too_short_for_a_step_is_an_error(tmp_path, corpus):
    with pytest.raises(GptlabError, match=r"time_budget 1e-06s is too short to take one training step"):
        run(tmp_path, corpus, eval_data=False, time_budget=1e-6)


def test_ctrl_c_saves_a_checkpoint_and_returns_interrupted(tmp_path, corpus, monkeypatch):
    real = trainer_module.iterate_batches

    def interrupted_at_batch_4(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 4:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(trainer_module, "iterate_batches", interrupted_at_batch_4)
    result = run(tmp_path, corpus)
    assert (result.stopped_reason, result.steps) == ("interrupted", 4)
    checkpoint = load_checkpoint(result.final_checkpoint)
    assert (result.final_checkpoint.name, checkpoint.step) == ("tiny_e1.pth", 4)


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    real_forward = GPT.forward
    calls = {"train": 0}

    def forward_that_diverges(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] > 7:  # in the second epoch (6 batches per epoch)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_that_diverges)
    with pytest.raises(GptlabError, match=r"loss became nan at step 8 .* last good checkpoint is .*tiny_e1\.pth"):
        run(tmp_path, corpus, checkpoint_every=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pth")) == ["tiny_e1.pth"]
    model, _, checkpoint = load_model(tmp_path / "ckpt" / "tiny_e1.pth")
    assert checkpoint.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_vocab_smaller_than_tokenizer_is_an_error(tmp_path, corpus):
    model_cfg, data_cfg, train_cfg = configs(tmp_path)
    model_cfg = model_cfg.model_copy(update={"tgt_vocab_size": 100})
    with pytest.raises(GptlabError, match="tgt_vocab_size 100 is smaller than the tokenizer's vocabulary"):
        train_fn(model_cfg, data_cfg, train_cfg, corpus)


def test_larger_vocab_is_allowed(tmp_path, corpus):
    model_cfg, data_cfg, train_cfg = configs(tmp_path, max_steps=1)
    result = train_fn(model_cfg.model_copy(update={"tgt_vocab_size": 320}), data_cfg, train_cfg, corpus)
    assert load_checkpoint(result.final_checkpoint).model_config.tgt_vocab_size == 320


def test_same_seed_same_run(tmp_path, corpus):
    first = run(tmp_path / "a", corpus, max_steps=4, eval_interval=100)
    second = run(tmp_path / "b", corpus, max_steps=4, eval_interval=100)
    a, b = load_checkpoint(first.final_checkpoint), load_checkpoint(second.final_checkpoint)
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert first.train_loss == second.train_loss


def ctrl_c_during_forward(monkeypatch, call: int, times: int = 1) -> None:
    """Send this process SIGINT (what Ctrl-C does) `times` times in the `call`-th training forward,
    in the middle of a step: after dropout has drawn, before the optimizer has moved."""
    real = tasks_module.LanguageModelTask.loss
    calls = {"n": 0}

    def loss_then_ctrl_c(self, model, batch):
        loss = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(tasks_module.LanguageModelTask, "loss", loss_then_ctrl_c)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, corpus, monkeypatch):
    model_cfg, data_cfg, train_cfg = configs(tmp_path / "whole")
    model_cfg = model_cfg.model_copy(update={"dropout": 0.1})  # the dropout masks must line up too
    whole = train_fn(model_cfg, data_cfg, train_cfg, corpus)

    _, _, parts_cfg = configs(tmp_path / "parts")
    with monkeypatch.context() as patch:
        ctrl_c_during_forward(patch, call=9)  # in step 9, the third of epoch 2: it finishes, then the run stops
        first = train_fn(model_cfg, data_cfg, parts_cfg, corpus)
    assert (first.stopped_reason, first.steps) == ("interrupted", 9)
    rest = train(
        model_cfg, data_cfg, parts_cfg, ByteTokenizer(), *corpus, progress=False, resume=first.final_checkpoint
    )

    assert (rest.stopped_reason, rest.steps, rest.epochs_completed) == ("completed", whole.steps, 3)
    assert rest.tokens_seen == whole.tokens_seen
    a, b = load_checkpoint(whole.final_checkpoint), load_checkpoint(rest.final_checkpoint)
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=0, atol=0, msg=name)
    assert rest.eval.loss == whole.eval.loss


def test_a_second_ctrl_c_stops_at_once_and_saves_nothing(tmp_path, corpus, monkeypatch, capsys):
    ctrl_c_during_forward(monkeypatch, call=8, times=2)  # in step 8, after epoch 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, corpus, checkpoint_every=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pth")) == ["tiny_e1.pth"]
    assert load_checkpoint(tmp_path / "ckpt" / "tiny_e1.pth").step == 6
    assert "stopped at once at step 7: nothing saved; the last checkpoint is" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C behaves as usual again


def test_a_second_ctrl_c_during_evaluation_saves_nothing_either(tmp_path, corpus, monkeypatch):
    ctrl_c_during_forward(monkeypatch, call=3)  # asks to stop after step 3
    real = tasks_module.LanguageModelTask.evaluate

    def evaluate_then_ctrl_c(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second press, between steps
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tasks_module.LanguageModelTask, "evaluate", evaluate_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, corpus, eval_interval=3)
    assert not list((tmp_path / "ckpt").glob("*.pth"))


def test_a_process_told_to_ignore_ctrl_c_goes_on_ignoring_it():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopRequest() as request:
            os.kill(os.getpid(), signal.SIGINT)
            assert not request.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 5}, "trained with other seed"),
        ({"shuffle": False}, "trained with other shuffle"),
        (
            {"train_text": "other words entirely. " * 40},
            r"trained with other training data \([\d,]+ tokens; this run's has",
        ),
    ],
)
def test_resume_refuses_other_data_or_order(tmp_path, corpus, change, message):
    first = run(tmp_path, corpus, max_steps=2)
    model_cfg, data_cfg, train_cfg = configs(tmp_path)
    train_cfg = train_cfg.model_copy(update={"seed": change.get("seed", 0)})
    data_cfg = data_cfg.model_copy(update={"shuffle": change.get("shuffle", True)})
    train_path = corpus[0]
    if "train_text" in change:
        train_path = tmp_path / "other.txt"
        train_path.write_text(change["train_text"])
    with pytest.raises(GptlabError, match=message):
        train(
            model_cfg, data_cfg, train_cfg, ByteTokenizer(), train_path, progress=False, resume=first.final_checkpoint
        )


def test_resume_refuses_a_checkpoint_without_random_states(tmp_path, corpus):
    first = run(tmp_path, corpus, max_steps=2)
    raw = torch.load(first.final_checkpoint, weights_only=True)
    del raw["rng"]
    torch.save(raw, tmp_path / "no_rng.pth")
    model_cfg, data_cfg, train_cfg = configs(tmp_path)
    with pytest.raises(GptlabError, match="holds no random generator states, so it cannot be resumed exactly"):
        train(model_cfg, data_cfg, train_cfg, ByteTokenizer(), *corpus, progress=False, resume=tmp_path / "no_rng.pth")


def test_resume_refuses_another_model(tmp_path, corpus):
    first = run(tmp_path, corpus, max_steps=2)
    model_cfg, data_cfg, train_cfg = configs(tmp_path)
    with pytest.raises(GptlabError, match="trained with other embed_dim"):
        train(
            model_cfg.model_copy(update={"embed_dim": 64}),
            data_cfg,
            train_cfg,
            ByteTokenizer(),
            *corpus,
            progress=False,
            resume=first.final_checkpoint,
        )


# ---- gradient accumulation ------------------------------------------------------------------------
def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(tmp_path, corpus):
    model_cfg, _, train_cfg = configs(tmp_path, max_steps=3, eval_interval=100)
    big_cfg = train_cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "a")})
    big = train_fn(model_cfg, DatasetConfig(batch_size=8), big_cfg, corpus, False)
    accumulated = train_fn(
        model_cfg,
        DatasetConfig(batch_size=2),
        train_cfg.model_copy(update={"grad_accum_steps": 4, "checkpoint_dir": str(tmp_path / "b")}),
        corpus,
        False,
    )
    a, b = load_checkpoint(big.final_checkpoint), load_checkpoint(accumulated.final_checkpoint)
    # Gradients agree to float32 roundoff (see the next test); Adam divides by sqrt(v), which
    # magnifies that roundoff in the embedding rows of tokens that barely occur: hence 1e-5 here.
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert big.train_loss == pytest.approx(accumulated.train_loss, abs=1e-6)
    assert big.tokens_seen == accumulated.tokens_seen


@pytest.mark.parametrize("model, task", [("transformer", "lm"), ("gpt", "chat")])
def test_shifted_windows_are_refused_for_pairs_and_conversations(model, task):
    from gptlab.training.tasks import task_for

    model_cfg = ModelConfig(model=model, embed_dim=16, num_layers=1, n_heads=2, seq_len=8, tgt_vocab_size=40)
    with pytest.raises(GptlabError, match="for a GPT trained on text"):
        task_for(model_cfg, DatasetConfig(shift_windows=True), TrainConfig(task=task), ByteTokenizer())


def test_micro_batches_are_weighted_by_their_counted_targets():
    """A short last micro-batch full of ignore_index targets weighs only its counted tokens."""
    from gptlab.training.batching import MicroBatch
    from gptlab.training.distributed import World
    from gptlab.training.optim import build_optimizer
    from gptlab.training.precision import Precision
    from gptlab.training.step import optimizer_step
    from gptlab.training.tasks import task_for

    torch.manual_seed(0)
    model_cfg = ModelConfig(embed_dim=16, num_layers=1, n_heads=2, seq_len=8, dropout=0.0, tgt_vocab_size=40)
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.0)
    x = torch.randint(0, 40, (5, 8))
    y = torch.randint(0, 40, (5, 8))
    y[3:, 2:] = -100  # the last two rows count 2 targets each
    task = task_for(model_cfg, DatasetConfig(batch_size=3), cfg, ByteTokenizer())
    cpu = torch.device("cpu")

    def grads_after(micro_batches):
        torch.manual_seed(1)
        model = GPT(model_cfg)
        optimizer = build_optimizer(model, cfg, cpu)
        result = optimizer_step(model, task, micro_batches, optimizer, Precision("fp32", cpu), World(), cpu, 0.0)
        return result.loss, [p.grad.clone() for p in model.parameters()]

    whole = [MicroBatch((x, y), task.num_targets((x, y)))]
    parts = [MicroBatch((x[:3], y[:3]), 24), MicroBatch((x[3:], y[3:]), 4)]
    loss_whole, grads_whole = grads_after(whole)
    loss_parts, grads_parts = grads_after(parts)
    assert loss_parts == pytest.approx(loss_whole, abs=1e-6)
    for a, b in zip(grads_whole, grads_parts):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_total_batch_tokens_sets_accumulation(tmp_path, corpus):
    result = run(tmp_path, corpus, eval_data=False, max_steps=1, total_batch_tokens=16 * 16 * 3)
    assert result.tokens_seen == 3 * 16 * 16  # 3 micro-batches of 16 windows of 16 tokens


def test_bad_accumulation_settings_are_clear_errors(tmp_path, corpus):
    with pytest.raises(GptlabError, match="total_batch_tokens 1000 is not a multiple of batch_size\\*seq_len = 256"):
        run(tmp_path, corpus, total_batch_tokens=1000)
    with pytest.raises(GptlabError, match="grad_accum_steps: Input should be greater than 0"):
        validated(TrainConfig, {"grad_accum_steps": 0})  # as the CLI reports it: one line naming the field


# ---- Muon ------------------------------------------------------------------------------------------
def test_muon_trains_saves_both_optimizers_and_resumes_exactly(tmp_path, corpus):
    from gptlab.training.optim import hidden_matrices

    model_cfg, data_cfg, train_cfg = configs(tmp_path / "whole", optimizer="muon", max_steps=6, eval_interval=100)
    whole = train_fn(model_cfg, data_cfg, train_cfg, corpus)
    state = load_checkpoint(whole.final_checkpoint).optimizer_state["optimizers"]
    assert set(state) == {"muon", "adamw"}
    hidden = hidden_matrices(GPT(model_cfg.model_copy(update={"tgt_vocab_size": 260})))
    assert len(state["muon"]["state"]) == len(hidden) == 2 * 4  # qkv, proj, fc, proj per block
    assert state["muon"]["param_groups"][0]["lr"] != state["adamw"]["param_groups"][0]["lr"]
    assert whole.eval.loss < math.log(260) - 0.5  # it learns (a uniform guess costs log 260)

    _, _, first_cfg = configs(tmp_path / "parts", optimizer="muon", max_steps=3, eval_interval=100)
    first = train_fn(model_cfg, data_cfg, first_cfg, corpus)
    rest = train(
        model_cfg,
        data_cfg,
        first_cfg.model_copy(update={"max_steps": 6}),
        ByteTokenizer(),
        *corpus,
        progress=False,
        resume=first.final_checkpoint,
    )
    a, b = load_checkpoint(whole.final_checkpoint), load_checkpoint(rest.final_checkpoint)
    for name, tensor in a.model_state.items():
        assert torch.equal(b.model_state[name], tensor), name

    with pytest.raises(GptlabError, match="trained with optimizer\\(s\\) adamw, muon.*resume with the --optimizer"):
        train(
            model_cfg,
            data_cfg,
            first_cfg.model_copy(update={"optimizer": "adamw", "max_steps": 6}),
            ByteTokenizer(),
            *corpus,
            progress=False,
            resume=first.final_checkpoint,
        )
