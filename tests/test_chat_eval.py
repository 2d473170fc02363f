"""`gptlab eval --task chat`: greedy answers to held-out conversations and what counts as exact."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.models import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.tokenizers.chat import with_chat_tokens
from gptlab.training.chat_eval import SLACK_TOKENS, ChatAnswer, answer_conversations
from gptlab.training.checkpoint import save_checkpoint

QUESTIONS = [
    [{"role": "user", "content": "what is 1+2?"}, {"role": "assistant", "content": "3"}],
    [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "what is 10+20?"},
        {"role": "assistant", "content": "30"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    return with_chat_tokens(CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz0123456789 +?."]))


def always(token_id: int, vocab_size: int) -> GPT:
    """A GPT whose every next token is `token_id`: the final norm outputs its bias (weight 0),
    a one-hot vector that the head maps to that id alone."""
    config = ModelConfig(embed_dim=16, n_heads=2, num_layers=1, seq_len=48, tgt_vocab_size=vocab_size, dropout=0.0)
    model = GPT(config.model_copy(update={"bias": True, "tie_embeddings": False})).eval()
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 1.0
    return model


def test_an_answer_counts_only_when_it_matches_and_ends():
    assert ChatAnswer([], "30", "30", ended=True).exact
    assert not ChatAnswer([], "30", "30", ended=False).exact  # ran on past the answer
    assert not ChatAnswer([], "30", "30 ", ended=True).exact
    assert not ChatAnswer([], "30", "3", ended=True).exact


def test_answers_stop_at_end_of_turn_or_run_on(tokenizer):
    end = tokenizer.special_tokens["<|end|>"]
    answers = answer_conversations(always(end, tokenizer.vocab_size), tokenizer, QUESTIONS, batch_size=2)
    assert [(a.answer, a.ended, a.exact) for a in answers] == [("", True, False), ("", True, False)]
    assert answers[1].prompt == QUESTIONS[1][:-1] and answers[1].reference == "30"

    three = tokenizer.encode("3")[0]
    answers = answer_conversations(always(three, tokenizer.vocab_size), tokenizer, QUESTIONS, batch_size=1)
    # batch of one: each may run on for its own reference's length plus the slack
    assert [(a.answer, a.ended) for a in answers] == [
        ("3" * (1 + SLACK_TOKENS), False),
        ("3" * (2 + SLACK_TOKENS), False),
    ]


def test_eval_task_chat_prints_a_transcript_and_the_rate(tokenizer, tmp_path, capsys):
    model = always(tokenizer.special_tokens["<|end|>"], tokenizer.vocab_size)
    save_checkpoint(tmp_path / "m.pth", model, tokenizer, model.config, DatasetConfig(), TrainConfig(), step=1, epoch=1)
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in QUESTIONS), encoding="utf-8")
    argv = ["eval", "--task", "chat", "--model_path", str(tmp_path / "m.pth"), "--data", str(data), "--device", "cpu"]
    assert main([*argv, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("user: what is 1+2?\nassistant:   (expected '3')\n")
    assert "be brief" not in out and "exact answers: 0/2 (0.0%)" in out

    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    assert main(argv) == 1
    assert "held.jsonl line 1: the conversation ends with a user message" in capsys.readouterr().err
    assert main([*argv, "--show", "-1"]) == 1
    assert "--show must be 0 or more" in capsys.readouterr().err


def test_the_demo_conversations_hold_out_their_questions(tmp_path):
    """make demo-chat's data: valid, every held-out question is one that training never asks."""
    import subprocess
    import sys
    from pathlib import Path

    from gptlab.data.conversations import read_conversations

    script = Path(__file__).resolve().parents[1] / "toy_data" / "chat" / "make_conversations.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    train = read_conversations(tmp_path / "train.jsonl")

    def questions(conversations) -> set[str]:  # numbers in either order count as the same question
        texts = {m["content"] for messages in conversations for m in messages if m["role"] == "user"}
        return {" ".join(sorted(text.replace("?", "").replace(",", "").split())) for text in texts}

    asked = questions(train)
    for name in ("valid", "test"):
        assert not asked & questions(read_conversations(tmp_path / f"{name}.jsonl"))
    assert len(train) == 12_000
