"""benchmarks/induction.py: the copy measure tells a model that copies from one that cannot, and the
script reads checkpoints and refuses, in one line, what it cannot measure."""

from __future__ import annotations

import math

import torch
from test_presets import ROOT, load_script, load_speedrun
from torch import nn

from gptlab.config import DatasetConfig, TrainConfig
from gptlab.tokenizers import load_tokenizer
from gptlab.training import save_checkpoint

from helpers import random_gpt

VOCAB = 50


class Copier(nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the current one."""

    def forward(self, idx: torch.Tensor):
        logits = torch.zeros(*idx.shape, VOCAB)
        for b, row in enumerate(idx.tolist()):
            for t, token in enumerate(row):
                earlier = [s for s in range(t) if row[s] == token]
                if earlier:
                    logits[b, t, row[earlier[-1] + 1]] = 100.0
        return logits, None


class Uniform(nn.Module):
    def forward(self, idx: torch.Tensor):
        return torch.zeros(*idx.shape, VOCAB), None


def load_induction(monkeypatch):
    load_speedrun(monkeypatch)  # induction.py imports it by name
    return load_script(ROOT / "benchmarks" / "induction.py", monkeypatch)


def test_copying_shows_as_a_repeated_sequence_near_zero_and_no_copying_as_no_gain(monkeypatch):
    induction = load_induction(monkeypatch)
    # Distinct tokens in each sequence: a copier knows every next token of a repeated one exactly.
    sequences = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(s))[:20] for s in range(4)])
    fresh, repeated = induction.copy_losses(Copier(), sequences)
    assert repeated < 1e-3 and fresh > math.log(VOCAB)  # a fresh one: copied wrongly, where it is not uniform
    fresh, repeated = induction.copy_losses(Uniform(), sequences)
    assert abs(fresh - math.log(VOCAB)) < 1e-4 and abs(repeated - math.log(VOCAB)) < 1e-4


def test_random_sequences_leave_out_the_special_tokens(monkeypatch):
    induction = load_induction(monkeypatch)
    sequences = induction.random_sequences(10, {0, 1, 2, 3}, count=50, length=40, seed=0)
    assert sequences.shape == (50, 40) and int(sequences.min()) >= 4 and int(sequences.max()) <= 9


def test_the_script_reads_a_checkpoint_and_refuses_copies_longer_than_its_context(monkeypatch, tmp_path, capsys):
    induction = load_induction(monkeypatch)
    tokenizer = load_tokenizer(None, ROOT / "toy_data" / "tiny_sp")
    model = random_gpt(tokenizer.vocab_size, seq_len=64)
    path = save_checkpoint(
        tmp_path / "tiny.pth", model, tokenizer, model.config, DatasetConfig(), TrainConfig(), step=0, epoch=0
    )
    text = ROOT / "toy_data" / "tiny_sp_train.txt"
    assert induction.main([str(path), "--length", "20", "--sequences", "3", "--val_data", str(text)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith(f"| {path} | {math.log(tokenizer.vocab_size):.2f} |") and row.count("|") == 7

    assert induction.main([str(path), "--length", "40", "--val_data", str(text)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass a smaller --length" in err and err.count("\n") == 1
    assert induction.main([str(path), "--val_data", str(tmp_path / "missing.txt")]) == 1
    assert "pass the validation text with --val_data" in capsys.readouterr().err
