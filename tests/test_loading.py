"""gptlab.load: one function opens any trained model (either kind of checkpoint, or an exported
directory) and reads the file once, also where `gptlab generate` decides how to decode."""

from __future__ import annotations

import pytest
import torch

import gptlab
from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.models.transformer import Transformer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.training import save_checkpoint


def tiny_checkpoint(directory, kind: str):
    tokenizer = CharTokenizer("abcdef")
    config = ModelConfig(
        model=kind, embed_dim=16, n_heads=2, num_layers=1, seq_len=8, max_source_len=8,
        tgt_vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config) if kind == "gpt" else Transformer(config)
    data_cfg, train_cfg = DatasetConfig(batch_size=2), TrainConfig(seed=3)
    path = directory / f"{kind}.pth"
    return save_checkpoint(path, model, tokenizer, config, data_cfg, train_cfg, step=1, epoch=1), model


@pytest.mark.parametrize(("kind", "cls"), [("gpt", GPT), ("transformer", Transformer)])
def test_load_builds_the_model_the_checkpoint_holds(tmp_path, kind, cls):
    path, model = tiny_checkpoint(tmp_path, kind)
    loaded = gptlab.load(path)
    assert isinstance(loaded.model, cls) and loaded.model_type == kind and not loaded.model.training
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("fab")) == "fab"
    assert loaded.train_config.seed == 3 and loaded.data_config.batch_size == 2
    assert loaded.checkpoint.step == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_load_reads_an_exported_directory(tmp_path):
    pytest.importorskip("safetensors")
    path, model = tiny_checkpoint(tmp_path, "gpt")
    assert main(["export", "--model_path", str(path), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    loaded = gptlab.load(tmp_path / "st")
    assert isinstance(loaded.model, GPT) and loaded.checkpoint is None and loaded.train_config is None
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)


def test_asking_for_another_kind_is_a_clear_error(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "transformer")
    with pytest.raises(GptlabError, match="holds an encoder-decoder Transformer, not a GPT; pass a GPT checkpoint"):
        gptlab.load(path, model_type="gpt")


@pytest.mark.parametrize("kind", ["gpt", "transformer"])
def test_generate_reads_the_checkpoint_once(tmp_path, kind, monkeypatch, capsys):
    path, _ = tiny_checkpoint(tmp_path, kind)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args[0]) or real_load(*args, **kwargs))
    args = ["generate", "--model_path", str(path), "--prompt", "abc", "--max_new_tokens", "3", "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    assert len(reads) == 1
