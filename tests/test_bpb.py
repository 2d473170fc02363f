"""Bits per byte: evaluate() against values computed by hand on a tiny text.

The convention (gptlab.training.metrics): every token of the prepared text, its <EOS> included,
costs the mean loss of the predicted tokens, so bpb = mean nats/token / ln 2 * tokens / UTF-8 bytes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.config import ModelConfig
from gptlab.data import TokenDataset, prepare
from gptlab.models import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.training import evaluate
from gptlab.training.metrics import bits_per_byte

# 96 characters, 18 of them two-byte UTF-8: bytes and characters differ on purpose.
TEXT = "naïve café, crème brûlée; " * 3 + "façade déjà vu!!!\n"
SEQ_LEN = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The char tokenizer of TEXT and TEXT prepared with it (one document: its chars, then <EOS>)."""
    root = tmp_path_factory.mktemp("bpb")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    tokenizer = CharTokenizer.train([TEXT])
    dataset = TokenDataset(prepare([root / "text.txt"], tokenizer, root / "prepared", progress=False), SEQ_LEN)
    ids = tokenizer.encode(TEXT) + [tokenizer.eos_id]
    assert len(dataset) * SEQ_LEN == len(ids) - 1  # the windows predict every token after the first
    return tokenizer, dataset, ids


class BigramTable(nn.Module):
    """Logits of the next token = one row of a fixed table, chosen by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)  # (V, V)

    def forward(self, idx, targets, return_logits=True):  # called as evaluate() calls a GPT
        logits = self.table[idx]  # (B, T, V)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_uniform_logits_cost_log2_vocab_bits_per_token(tiny):
    tokenizer, dataset, ids = tiny
    vocab = 64  # more rows than the tokenizer's ids: padded rows still take probability
    model = GPT(ModelConfig(embed_dim=16, num_layers=1, n_heads=2, seq_len=SEQ_LEN, tgt_vocab_size=vocab))
    for param in model.parameters():
        nn.init.zeros_(param)  # all logits 0: every next token has probability 1/64
    result = evaluate(model, dataset, batch_size=3)
    utf8_bytes = len(TEXT.encode("utf-8"))
    assert utf8_bytes == 114 and len(ids) == 97
    assert result.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(6.0 * 97 / 114, rel=1e-6)  # log2(64) bits per token


def test_bits_per_byte_of_a_bigram_model_computed_by_hand(tiny):
    tokenizer, dataset, ids = tiny
    V = tokenizer.vocab_size
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 3
    rows = table.tolist()

    def nats(current: int, following: int) -> float:
        row = rows[current]
        return math.log(sum(math.exp(v) for v in row)) - row[following]  # -log softmax(row)[following]

    total_nats = sum(nats(a, b) for a, b in zip(ids, ids[1:]))
    mean_nats = total_nats / (len(ids) - 1)
    expected = mean_nats / math.log(2) * len(ids) / len(TEXT.encode("utf-8"))

    # 8 windows in batches of 5 and 3: the smaller last batch must not weigh more per token.
    result = evaluate(BigramTable(table), dataset, batch_size=5)
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(mean_nats, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(mean_nats), rel=1e-6)


def test_one_nat_per_byte_is_one_over_ln2_bits():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(1.0, 1.0) == pytest.approx(1 / math.log(2))
    assert bits_per_byte(2.0, 4.0) == pytest.approx(0.5 / math.log(2))  # 4 bytes per token: a quarter
