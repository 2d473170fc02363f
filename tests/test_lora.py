"""LoRA: adapters that start as the identity, merge exactly, train alone on a frozen base, resume
exactly, and checkpoints that point to (and check) their base; each bad input is one clear line."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gptlab.training.tasks as tasks_module
from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.interop.base_models import fine_tuning_base
from gptlab.loading import load
from gptlab.models import GPT
from gptlab.models.lora import LoRALinear, apply_lora, merge_lora, merged_state
from gptlab.models.transformer import Transformer
from gptlab.tokenizers.bpe import BPETokenizer
from gptlab.training import Trainer, load_checkpoint, load_model, save_checkpoint, train

from helpers import random_gpt

TEXT = "\n".join(["the cat sat on the mat.", "a dog ran in the park.", "we like to read books."] * 25) + "\n"
SHAPE = dict(embed_dim=32, n_heads=2, num_layers=2, seq_len=16)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every B a random value, so that the adapters change what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(0.05 * torch.randn(module.lora_B.shape, generator=generator))


# ---- the layer and the model ---------------------------------------------------------------------
@pytest.mark.parametrize("targets, adapted", [("attention", 4), ("mlp", 4), ("both", 8)])
def test_zero_initialised_adapters_leave_the_gpt_unchanged(targets, adapted):
    base = random_gpt(100, **SHAPE)
    tuned = random_gpt(100, **SHAPE)  # the same weights (same seed)
    names = apply_lora(tuned, rank=4, alpha=8, targets=targets)
    assert len(names) == adapted
    assert all(isinstance(tuned.get_submodule(name), LoRALinear) for name in names)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tuned(idx)[0], base(idx)[0])
    # The base's keys are unchanged; the adapters add theirs beside them.
    assert set(base.state_dict()) < set(tuned.state_dict())


def test_zero_initialised_adapters_leave_the_transformer_unchanged():
    torch.manual_seed(0)
    config = ModelConfig(model="transformer", tgt_vocab_size=50, dropout=0.0, **SHAPE)
    base = Transformer(config).eval()
    tuned = Transformer(config).eval()
    tuned.load_state_dict(base.state_dict())
    names = apply_lora(tuned, rank=2, alpha=4, targets="attention")
    # query, key_value and proj of the encoder's self-attention and the decoder's self and cross attention
    assert len(names) == 3 * (2 + 2 * 2) and any("cross_attn.key_value" in name for name in names)
    src, tgt = torch.randint(4, 50, (2, 10)), torch.randint(4, 50, (2, 7))
    mask = torch.ones(2, 10, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(tuned(src, tgt, mask)[0], base(src, tgt, mask)[0])


def test_merged_equals_unmerged():
    model = random_gpt(100, **SHAPE)
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(idx)[0]
    apply_lora(model, rank=4, alpha=8, targets="both")
    randomise_adapters(model)
    with torch.no_grad():
        unmerged = model(idx)[0]
        plain = GPT(model.config).eval()
        plain.load_state_dict(merged_state(model.state_dict(), scaling=8 / 4))  # the checkpoint path
        merged = merge_lora(model)(idx)[0]
    assert (unmerged - before).abs().max().item() > 1e-2  # the adapters do change the output
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain(idx)[0], unmerged, rtol=0, atol=1e-5)


def test_only_adapter_parameters_receive_gradients():
    model = random_gpt(100, **SHAPE).train()
    apply_lora(model, rank=4, alpha=8, targets="attention")
    idx = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    _, loss = model(idx, idx)
    loss.backward()
    for name, param in model.named_parameters():
        is_adapter = name.endswith(("lora_A", "lora_B"))
        assert param.requires_grad == is_adapter, name
        assert (param.grad is not None) == is_adapter, name
    qkv = model.blocks[0].attn.qkv
    assert qkv.lora_B.grad.abs().sum() > 0 and qkv.lora_A.grad.abs().sum() == 0  # A learns once B is not 0


# ---- training runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([TEXT], 300, progress=False)


@pytest.fixture
def base(tmp_path, tokenizer) -> Path:
    """A pretrained GPT to fine-tune: a gptlab checkpoint with random weights, and the data."""
    model = random_gpt(tokenizer.vocab_size, **SHAPE)
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "eval.txt").write_text(TEXT[:400])
    cfg = model.config
    return save_checkpoint(
        tmp_path / "base.pth", model, tokenizer, cfg, DatasetConfig(), TrainConfig(), step=1, epoch=1
    )


def lora_configs(tmp_path, name="lora", **changes):
    settings = {
        "epochs": 2, "learning_rate": 1e-2, "warmup_steps": 2, "eval_interval": 3, "eval_batches": 2,
        "checkpoint_every": 1, "experiment_name": name, "checkpoint_dir": str(tmp_path / "ckpt"),
        "log_dir": str(tmp_path / "runs"), "device": "cpu", "seed": 0, "lora_rank": 4, "dropout": 0.1,
    }  # fmt: skip
    settings |= changes
    model_values = {"dropout": settings.pop("dropout")}
    model_cfg, tokenizer, state = fine_tuning_base(tmp_path / "base.pth", model_values)
    return model_cfg, DatasetConfig(batch_size=8), TrainConfig(**settings), tokenizer, state


def run_lora(tmp_path, name="lora", resume=None, trainer=False, **changes):
    model_cfg, data_cfg, train_cfg, tokenizer, state = lora_configs(tmp_path, name, **changes)
    args = (model_cfg, data_cfg, train_cfg, tokenizer, tmp_path / "train.txt", tmp_path / "eval.txt")
    kwargs = dict(progress=False, resume=resume, init_weights=state, init_from=str(tmp_path / "base.pth"))
    if trainer:
        run = Trainer(*args, **kwargs)
        return run, run.run()
    return train(*args, **kwargs)


def test_a_lora_run_trains_only_the_adapters_and_saves_them_alone(tmp_path, base, capsys):
    before = load_checkpoint(base).model_state
    run, result = run_lora(tmp_path, trainer=True)
    assert result.steps > 4 and result.train_loss < 6
    # Every base weight is bit-identical after training; the adapters moved.
    state = run.plain_model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(state[name], tensor), name
    assert all(state[name].abs().sum() > 0 for name in state if name.endswith("lora_B"))
    # The optimizer holds the adapters only, and their moments.
    held = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for n, p in run.plain_model.named_parameters() if "lora_" in n}
    out = capsys.readouterr().out
    # rank 4 x (in + out) of qkv (32+96), attn.proj (32+32), mlp.fc (32+128), mlp.proj (128+32), 2 blocks
    assert '"trainable_params": 4096' in out and "on 8 layers (both): 4,096 trainable of" in out

    checkpoint = load_checkpoint(result.final_checkpoint)
    assert set(checkpoint.model_state) == {n for n in state if "lora_" in n}
    lora = checkpoint.extra["lora"]
    assert (lora["rank"], lora["alpha"], lora["targets"], lora["merged"]) == (4, 8.0, "both", False)
    assert lora["base"] == str(base)
    with pytest.raises(GptlabError, match="holds LoRA adapters for the base .*not a whole model"):
        load_model(result.final_checkpoint)
    # Loaded with its base, it is the trained model.
    model = load(result.final_checkpoint).model
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], run.plain_model.eval()(idx)[0], rtol=0, atol=1e-5)


def test_a_merged_checkpoint_is_a_whole_model_equal_to_the_adapters_on_their_base(tmp_path, base):
    adapters = run_lora(tmp_path, "adapters", lora_targets="attention").final_checkpoint
    merged = run_lora(tmp_path, "merged", lora_targets="attention", lora_save="merged").final_checkpoint
    whole, _, checkpoint = load_model(merged)  # a plain checkpoint: any loader reads it
    assert checkpoint.extra["lora"]["merged"] and set(checkpoint.extra["lora"]["adapters"])
    adapted = load(adapters).model
    for name, tensor in whole.state_dict().items():
        assert torch.equal(adapted.state_dict()[name], tensor), name
    untouched = load_checkpoint(base).model_state["blocks.0.mlp.fc.weight"]
    assert torch.equal(whole.state_dict()["blocks.0.mlp.fc.weight"], untouched)  # not a target
    assert os.path.getsize(adapters) < os.path.getsize(merged) / 3


def ctrl_c_in_step(monkeypatch, call: int) -> None:
    """Send SIGINT during the forward pass of training step `call` (the trainer finishes the step, saves, stops)."""
    real, calls = tasks_module.LanguageModelTask.loss, {"n": 0}

    def loss_then_ctrl_c(self, model, batch):
        loss = real(self, model, batch)
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(tasks_module.LanguageModelTask, "loss", loss_then_ctrl_c)


@pytest.mark.parametrize("save", ["adapter", "merged"])
def test_an_interrupted_and_resumed_lora_run_matches_an_uninterrupted_one(tmp_path, base, monkeypatch, save):
    whole = run_lora(tmp_path, "whole", epochs=3, lora_save=save)
    with monkeypatch.context() as patch:
        ctrl_c_in_step(patch, call=7)  # mid epoch 2 (the dropout masks and data position must line up)
        first = run_lora(tmp_path, "parts", epochs=3, lora_save=save)
    assert (first.stopped_reason, first.steps) == ("interrupted", 7)
    rest = run_lora(tmp_path, "parts", epochs=3, lora_save=save, resume="auto")
    assert (rest.stopped_reason, rest.steps, rest.tokens_seen) == ("completed", whole.steps, whole.tokens_seen)
    a, b = load_checkpoint(whole.final_checkpoint), load_checkpoint(rest.final_checkpoint)
    assert set(a.model_state) == set(b.model_state)
    for name, tensor in a.model_state.items():
        assert torch.equal(b.model_state[name], tensor), name
    assert rest.eval.loss == whole.eval.loss


def test_resuming_needs_the_same_lora_settings_and_base(tmp_path, base, tokenizer):
    first = run_lora(tmp_path, max_steps=2)
    with pytest.raises(
        GptlabError, match="was trained with other --lora_rank, --lora_alpha; resume with the checkpoint's LoRA"
    ):
        run_lora(tmp_path, resume=first.final_checkpoint, lora_rank=2)
    with pytest.raises(GptlabError, match="is a LoRA run; resume it with its --init_from and --lora_rank"):
        model_cfg, data_cfg, train_cfg, _, state = lora_configs(tmp_path, lora_rank=None)
        train(model_cfg, data_cfg, train_cfg, tokenizer, tmp_path / "train.txt", progress=False,
              resume=first.final_checkpoint, init_weights=state)  # fmt: skip
    other = random_gpt(tokenizer.vocab_size, seed=5, **SHAPE)
    save_checkpoint(base, other, tokenizer, other.config, DatasetConfig(), TrainConfig(), step=1, epoch=1)
    with pytest.raises(GptlabError, match="trained on other base weights than --init_from .* gives now"):
        run_lora(tmp_path, resume=first.final_checkpoint)


def test_lora_without_a_pretrained_model_is_refused(tmp_path, tokenizer):
    (tmp_path / "train.txt").write_text(TEXT)
    model_cfg = ModelConfig(**SHAPE)
    train_cfg = TrainConfig(lora_rank=4, checkpoint_dir=str(tmp_path), log_dir=str(tmp_path / "runs"))
    with pytest.raises(GptlabError, match="--lora_rank fine-tunes a pretrained model.*pass --init_from"):
        train(model_cfg, DatasetConfig(batch_size=8), train_cfg, tokenizer, tmp_path / "train.txt", progress=False)
    assert not list(tmp_path.glob("*.pth"))


# ---- the command line ----------------------------------------------------------------------------
@pytest.fixture
def gptlab(tmp_path, monkeypatch, capsys):
    """Run `gptlab ARGS...` in tmp_path, in this process: its exit status and what it printed."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> SimpleNamespace:
        capsys.readouterr()
        status = main(list(args))
        printed = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=printed.out, stderr=printed.err)

    return run


TRAIN = ["train", "--init_from", "base.pth", "--train_data", "train.txt", "--batch_size", "8", "--max_steps", "3",
         "--device", "cpu", "--no_progress", "--dropout", "0"]  # fmt: skip


def test_cli_trains_adapters_that_generate_eval_and_export_merged(tmp_path, base, gptlab):
    trained = gptlab(*TRAIN, "--lora_rank", "4", "--lora_targets", "mlp", "--experiment_name", "run")
    assert trained.returncode == 0, trained.stderr
    assert "LoRA rank 4, alpha 8 on 4 layers (mlp): 2,560 trainable of" in trained.stdout
    adapters = load_checkpoint(tmp_path / "run_e1.pth")
    assert all("mlp" in name and "lora_" in name for name in adapters.model_state)

    generated = gptlab("generate", "--model_path", "run_e1.pth", "--prompt", "the", "--length", "4")
    assert generated.returncode == 0 and generated.stdout.startswith("the"), generated.stderr
    evaluated = gptlab("eval", "--model_path", "run_e1.pth", "--data", "train.txt", "--max_batches", "1")
    assert evaluated.returncode == 0 and "bits/byte" in evaluated.stdout, evaluated.stderr

    exported = gptlab("export", "--model_path", "run_e1.pth", "--format", "safetensors", "--out", "st")
    assert exported.returncode == 0, exported.stderr
    from gptlab.interop import load_safetensors_dir

    model, _, _ = load_safetensors_dir(tmp_path / "st")
    merged = load(tmp_path / "run_e1.pth").model
    for name, tensor in merged.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not torch.equal(merged.blocks[0].mlp.fc.weight, load_checkpoint(base).model_state["blocks.0.mlp.fc.weight"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora_rank", "0"], "error: invalid config: lora_rank: Input should be greater than 0"),
        (["--lora_rank", "4", "--lora_targets", "embeddings"], "error: invalid config: lora_targets: Input should be"),
        (["--lora_alpha", "8"], "error: invalid config: TrainConfig: lora_alpha is a LoRA setting: set lora_rank"),
        (["--lora_rank", "4", "--optimizer", "muon"], "error: LoRA trains its adapters with AdamW; drop --optimizer"),
    ],
)
def test_bad_lora_flags_are_one_line(tmp_path, base, gptlab, flags, message):
    result = gptlab(*TRAIN, *flags)
    assert result.returncode == 1 and result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith(message), result.stderr
    assert not list(tmp_path.glob("gpt_experiment*"))


def test_lora_rank_without_init_from_is_one_line(tmp_path, base, gptlab, tokenizer):
    tokenizer.save(tmp_path / "tok")
    argv = ["train", "--tokenizer", "tok", "--train_data", "train.txt", "--lora_rank", "4", "--max_steps", "1"]
    result = gptlab(*argv, "--device", "cpu", "--no_progress")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "--lora_rank fine-tunes a pretrained model" in result.stderr


def test_an_adapter_checkpoint_whose_base_changed_or_went_is_one_line(tmp_path, base, gptlab, tokenizer):
    assert gptlab(*TRAIN, "--lora_rank", "2", "--experiment_name", "run").returncode == 0
    other = random_gpt(tokenizer.vocab_size, seed=5, **SHAPE)
    save_checkpoint(base, other, tokenizer, other.config, DatasetConfig(), TrainConfig(), step=1, epoch=1)
    result = gptlab("generate", "--model_path", "run_e1.pth", "--prompt", "the", "--length", "2")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "its base base.pth has changed since the adapters were trained" in result.stderr
    base.unlink()
    result = gptlab("generate", "--model_path", "run_e1.pth", "--prompt", "the", "--length", "2")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "holds LoRA adapters whose base base.pth is not found" in result.stderr


def test_adapters_on_a_hugging_face_gpt2_load_and_export_merged(tmp_path, gptlab):
    transformers = pytest.importorskip("transformers")
    from gpt2_dirs import save_random_gpt2

    (tmp_path / "gpt2").mkdir()
    save_random_gpt2(tmp_path / "gpt2", BPETokenizer.train([TEXT], 270, pattern="gpt2", progress=False), 32, 2, 0.05)
    (tmp_path / "train.txt").write_text(TEXT)
    argv = ["train", "--init_from", "gpt2", "--train_data", "train.txt", "--batch_size", "8", "--max_steps", "2",
            "--seq_len", "16", "--device", "cpu", "--no_progress", "--lora_rank", "2", "--experiment_name", "hf"]  # fmt: skip
    trained = gptlab(*argv)
    assert trained.returncode == 0, trained.stderr
    assert load_checkpoint(tmp_path / "hf_e1.pth").extra["lora"]["base"] == "gpt2"
    loaded = load(tmp_path / "hf_e1.pth")
    model, tokenizer = loaded.model, loaded.tokenizer  # the base re-imported, fingerprint checked
    exported = gptlab("export", "--model_path", "hf_e1.pth", "--format", "hf", "--out", "exported")
    assert exported.returncode == 0, exported.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([tokenizer.encode(TEXT[:200])[:16]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids)[0], rtol=0, atol=1e-4)
