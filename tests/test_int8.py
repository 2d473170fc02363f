"""int8 weights (`--dtype int8`): decoding with the KV cache equals a full forward in int8, a row's
result does not depend on its batch, the logits stay near fp32's, and the unsupported cases
(a Transformer checkpoint, a GPU) are one clear line."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, SampleConfig, TrainConfig
from gptlab.device import weights_dtype
from gptlab.errors import GptlabError
from gptlab.generation import generate, generate_token_ids, ready_for_generation
from gptlab.models.int8 import Int8Linear, int8_supported
from gptlab.models.transformer import Transformer
from gptlab.tokenizers import load_tokenizer
from gptlab.training import save_checkpoint

from helpers import random_gpt

pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # see conftest.py
    pytest.mark.skipif(not int8_supported(), reason="this torch has no fbgemm kernels"),
]
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


def int8_and_fp32(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    fp32 = random_gpt(VOCAB, seed=seed, seq_len=64)
    return ready_for_generation(copy.deepcopy(fp32), torch.qint8), fp32


def test_every_linear_becomes_int8_and_the_embedding_stays_float():
    int8, fp32 = int8_and_fp32()
    linears = [name for name, m in fp32.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(int8.get_submodule(name), Int8Linear) for name in linears)
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())
    assert int8.wte.weight.dtype == torch.float32 and torch.equal(int8.wte.weight, fp32.wte.weight)


def test_int8_decoding_with_the_cache_equals_an_int8_full_forward():
    int8, _ = int8_and_fp32()
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = int8(ids)  # (2, 40, V)
        cache = int8.new_kv_cache(batch=2)
        int8(ids[:, :10], kv_cache=cache)  # a prefill of 10, then one token a step
        steps = torch.cat([int8(ids[:, t : t + 1], kv_cache=cache)[0] for t in range(10, 40)], dim=1)
    torch.testing.assert_close(steps, full[:, 10:], rtol=0, atol=1e-5)


def test_a_rows_result_does_not_depend_on_its_batch():
    int8, _ = int8_and_fp32()
    prompts = [[5, 9, 2, 7], [60], [3, 3, 40, 41, 42, 43, 44]]
    cfg = SampleConfig(greedy=True, max_new_tokens=12)
    together = list(generate_token_ids(int8, prompts, cfg, pad_id=0))
    for row, prompt in enumerate(prompts):
        alone = [step[0] for step in generate_token_ids(int8, [prompt], cfg, pad_id=0)]
        assert alone == [step[row] for step in together]
    layer = int8.blocks[0].mlp.fc
    x = torch.randn(5, layer.in_features) * torch.tensor([[1e-3], [1.0], [1e3], [0.0], [7.0]])  # very different rows
    with torch.no_grad():
        batch = layer(x)
        for i in range(5):
            torch.testing.assert_close(layer(x[i : i + 1]), batch[i : i + 1], rtol=0, atol=1e-6)


def test_int8_logits_stay_close_to_fp32():
    int8, fp32 = int8_and_fp32()
    ids = torch.randint(1, VOCAB, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = int8(ids)[0], fp32(ids)[0]
    error = (got - want).norm() / want.norm()
    assert 0 < error < 0.06  # int8 rounds (not exact), by a few percent on these large random weights
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree > 0.9


def test_int8_is_for_cpus_and_gpts_only():
    assert weights_dtype("int8", torch.device("cpu")) == torch.qint8
    for device in ("cuda", "mps"):
        with pytest.raises(GptlabError, match="int8 runs on CPUs only"):
            weights_dtype("int8", torch.device(device))
    transformer = Transformer(
        ModelConfig(model="transformer", embed_dim=32, n_heads=4, num_layers=1, seq_len=8, tgt_vocab_size=20)
    )
    with pytest.raises(GptlabError, match="int8 is for GPT checkpoints"):
        ready_for_generation(transformer, torch.qint8)


def tiny_checkpoint(path: Path) -> Path:
    tokenizer = load_tokenizer(None, ROOT / "toy_data" / "tiny_sp")
    model = random_gpt(tokenizer.vocab_size, seq_len=64)
    return save_checkpoint(path, model, tokenizer, model.config, DatasetConfig(), TrainConfig(), step=0, epoch=0)


def test_generate_command_with_int8(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "tiny.pth")
    status = main(["generate", "--model_path", str(path), "--device", "cpu", "--dtype", "int8", "--greedy",
                   "--prompt", "Once", "--length", "10"])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    tokenizer = load_tokenizer(None, ROOT / "toy_data" / "tiny_sp")
    model = ready_for_generation(random_gpt(tokenizer.vocab_size, seq_len=64), torch.qint8)
    want = generate(model, tokenizer, "Once", SampleConfig(greedy=True, max_new_tokens=10))[0]
    assert out == "Once" + want + "\n"


def test_int8_of_a_transformer_checkpoint_is_one_clear_line(tmp_path, capsys):
    from gptlab.tokenizers import CharTokenizer

    cfg = ModelConfig(model="transformer", embed_dim=16, n_heads=2, num_layers=1, seq_len=8, tgt_vocab_size=10)
    path = save_checkpoint(
        tmp_path / "s2s.pth", Transformer(cfg), CharTokenizer("abcdef"), cfg, DatasetConfig(), TrainConfig(),
        step=0, epoch=1,
    )  # fmt: skip
    status = main(["generate", "--model_path", str(path), "--prompt", "abc", "--dtype", "int8", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert (
        status == 1 and err == "error: --dtype int8 is for GPT checkpoints; decode this Transformer in fp32 (or bf16)"
    )
