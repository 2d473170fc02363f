"""Supervised fine-tuning on conversations: the JSONL reader and its bad lines, padded rows whose
labels keep assistant tokens only, rows for new tokens in trained weights, and `gptlab train
--task chat` end to end (from scratch, resumed, and from a plain checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import ModelConfig
from gptlab.data.conversations import ChatDataset, read_conversations
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.models.fused_loss import IGNORE_INDEX
from gptlab.models.vocab import with_new_token_rows
from gptlab.tokenizers import CharTokenizer, save_tokenizer
from gptlab.tokenizers.chat import CHAT_TOKENS, encode_chat, has_chat_template, with_chat_tokens
from gptlab.training import load_checkpoint, load_model
from gptlab.training.chat_start import chat_start

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +?.,:"
TINY_MODEL = ["--embed_dim", "32", "--num_layers", "1", "--n_heads", "2", "--seq_len", "40", "--batch_size", "8"]


def conversation(i: int) -> dict:
    a, b = i % 17, (i * 7) % 23
    messages = [{"role": "user", "content": f"what is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "answer with a number."})
    return {"messages": messages}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ---- the reader ---------------------------------------------------------------------------------
def test_reader_takes_openai_lines_and_skips_empty_ones(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("\ufeff" + json.dumps(conversation(0)) + "\n\n" + json.dumps(conversation(1)) + "\n")
    assert read_conversations(path) == [conversation(0)["messages"], conversation(1)["messages"]]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('{"text": "hi"}', 'not a {"messages": [...]} object'),
    ('{"messages": []}', "at least one message"),
    ('{"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 1 has role missing"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "message 1 has role 'bot'"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}', "empty content"),
    ('{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}', "a list"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]}', "ends with a user"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "chats.jsonl", [conversation(0), line, conversation(1)])
    with pytest.raises(GptlabError, match=rf"chats.jsonl line 2: .*{_escaped(problem)}.*pass --skip_bad_lines"):
        read_conversations(path)


def test_skip_bad_lines_counts_them_in_one_warning(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [conversation(0), *(line for line, _ in BAD_LINES), conversation(1)])
    with pytest.warns(UserWarning, match=r"skipped 8 bad line\(s\) \(line 2, 3, 4, 5, 6, 7, 8, 9; first: not valid"):
        assert len(read_conversations(path, skip_bad_lines=True)) == 2
    write_jsonl(path, ["{not json"])
    with pytest.warns(UserWarning), pytest.raises(GptlabError, match="holds no conversations"):
        read_conversations(path, skip_bad_lines=True)


def _escaped(text: str) -> str:
    return "".join("\\" + c if c in "[]{}().*+?" else c for c in text)


# ---- rows and labels ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return with_chat_tokens(CharTokenizer.train([ALPHABET]))


def test_labels_keep_assistant_tokens_only(tokenizer):
    s, u, a, e = (tokenizer.special_tokens[t] for t in CHAT_TOKENS)
    c = {ch: tokenizer.encode(ch)[0] for ch in "xyz12"}
    first = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "yz"},
        {"role": "assistant", "content": "1"},
    ]
    second = [{"role": "user", "content": "z"}, {"role": "assistant", "content": "22"}]
    dataset = ChatDataset([first, second], tokenizer, seq_len=16)
    x, y = dataset.batch([0, 1])
    ids0 = [s, c["x"], e, u, c["y"], c["z"], e, a, c["1"], e]
    ids1 = [u, c["z"], e, a, c["2"], c["2"], e]
    assert x.shape == y.shape == (2, len(ids0) - 1)  # cut to the longest row, not seq_len
    assert x[0].tolist() == ids0[:-1]
    assert y[0].tolist() == [IGNORE_INDEX] * 7 + [c["1"], e]  # only "1" and its <|end|> are learnt
    pad = tokenizer.pad_id
    assert x[1].tolist() == ids1 + [pad] * 2  # one conversation per row, <PAD> after it
    assert y[1].tolist() == [IGNORE_INDEX] * 3 + [c["2"], c["2"], e] + [IGNORE_INDEX] * 3
    assert dataset.num_tokens == len(ids0) + len(ids1) and dataset.num_targets == 5
    assert dataset.bytes_per_token == 3 / 5


def test_long_conversations_are_cut_with_a_warning(tokenizer):
    long = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "1"}]
    short = [{"role": "user", "content": "y"}, {"role": "assistant", "content": "2"}]
    with pytest.warns(UserWarning, match=r"1 conversation\(s\) longer than .* 1 of them leaving no assistant token"):
        dataset = ChatDataset([long, short], tokenizer, seq_len=20)
    assert len(dataset) == 1
    with pytest.warns(UserWarning), pytest.raises(GptlabError, match="no conversation has an assistant token"):
        ChatDataset([long], tokenizer, seq_len=20)


# ---- rows for new tokens ----------------------------------------------------------------------------
@pytest.mark.parametrize(("tie", "rows", "value_tables"), [(True, 50, 0), (False, 50, 0), (True, 60, 0), (True, 50, 1)])
def test_new_token_rows_are_the_mean_and_leave_old_logits_alone(tie, rows, value_tables):
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16, n_heads=2, num_layers=2, seq_len=8, tgt_vocab_size=rows, tie_embeddings=tie,
        value_embeddings=value_tables,
    )  # fmt: skip
    model = GPT(config).eval()
    new_ids = [50, 51, 52, 53]
    grown_cfg, state = with_new_token_rows(model.state_dict(), config, new_ids, trained_rows=50)
    assert grown_cfg.tgt_vocab_size == max(rows, 54)
    grown = GPT(grown_cfg).eval()
    grown.load_state_dict(state)
    tables = [(model.wte, grown.wte), (model.lm_head, grown.lm_head), *zip(model.value_embeds, grown.value_embeds)]
    assert len(tables) == 2 + value_tables
    for old, table in ((old.weight, new.weight) for old, new in tables):
        assert torch.allclose(table[new_ids], old[:50].mean(dim=0).expand(4, -1))  # each table its own mean
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.allclose(grown(x)[0][..., :50], model(x)[0][..., :50], atol=1e-6)
    assert (grown.lm_head.weight is grown.wte.weight) == tie


def test_chat_start_adds_markers_and_rows(tokenizer):
    plain = CharTokenizer.train([ALPHABET])
    config = ModelConfig(embed_dim=16, n_heads=2, num_layers=1, seq_len=8, tgt_vocab_size=plain.vocab_size)
    state = GPT(config).state_dict()
    new_cfg, chat_tok, new_state = chat_start(config, plain, state)
    assert has_chat_template(chat_tok) and new_cfg.tgt_vocab_size == chat_tok.vocab_size
    assert new_state["wte.weight"].shape[0] == chat_tok.vocab_size
    assert chat_start(config, tokenizer, None) == (config, tokenizer, None)  # already a chat tokenizer
    with pytest.raises(GptlabError, match="drop --model transformer"):
        chat_start(ModelConfig(model="transformer"), plain, None)
    # LoRA would freeze the markers' new rows and fingerprint a grown base: refused in one line
    with pytest.raises(GptlabError, match="needs a base that already has the chat markers"):
        chat_start(config, plain, state, lora=True)
    grown_cfg, grown_tok, grown_state = chat_start(config, plain, state)
    assert chat_start(grown_cfg, grown_tok, grown_state, lora=True)[1] is grown_tok  # a chat base: fine


# ---- gptlab train --task chat ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    write_jsonl(tmp / "train.jsonl", [conversation(i) for i in range(60)])
    write_jsonl(tmp / "eval.jsonl", [conversation(i) for i in range(60, 76)])
    save_tokenizer(CharTokenizer.train([ALPHABET]), tmp / "tok")  # without the markers
    return tmp


def chat_args(files: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", "chat", "--train_data", str(files / "train.jsonl"), *TINY_MODEL,
            "--checkpoint_dir", str(out), "--log_dir", str(out / "runs"), "--no_progress", "--dropout", "0",
            *extra]  # fmt: skip


def test_train_chat_from_scratch_and_resume_exactly(chat_files, tmp_path, capsys):
    base = chat_args(chat_files, tmp_path, "--tokenizer", str(chat_files / "tok"), "--eval_data")
    base += [str(chat_files / "eval.jsonl"), "--eval_batches", "1", "--eval_interval", "2"]
    assert main([*base, "--experiment_name", "whole", "--max_steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "max_steps: 4 steps" in out
    model, tokenizer, _ = load_model(tmp_path / "whole_e1.pth")
    assert has_chat_template(tokenizer) and model.config.tgt_vocab_size == tokenizer.vocab_size

    assert main([*base, "--experiment_name", "cut", "--max_steps", "2"]) == 0
    assert main([*base, "--experiment_name", "cut", "--max_steps", "4", "--resume", "auto"]) == 0
    whole, cut = load_checkpoint(tmp_path / "whole_e1.pth"), load_checkpoint(tmp_path / "cut_e1.pth")
    assert cut.step == 4
    for name, tensor in whole.model_state.items():
        assert torch.equal(tensor, cut.model_state[name]), name


def test_train_chat_from_a_plain_checkpoint_grows_its_vocabulary(chat_files, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("what is 1+2? 3. " * 200, encoding="utf-8")
    plain_args = ["train", "--tokenizer", str(chat_files / "tok"), "--train_data", str(text), *TINY_MODEL,
                  "--max_steps", "1", "--experiment_name", "plain", "--checkpoint_dir", str(tmp_path),
                  "--log_dir", str(tmp_path / "runs"), "--no_progress"]  # fmt: skip
    assert main(plain_args) == 0
    plain, plain_tok, _ = load_model(tmp_path / "plain_e1.pth")
    # A vanishing learning rate keeps the starting weights: the start really is the checkpoint.
    args = chat_args(chat_files, tmp_path, "--init_from", str(tmp_path / "plain_e1.pth"), "--max_steps", "1")
    assert main([*args, "--experiment_name", "tuned", "--learning_rate", "1e-30"]) == 0
    tuned, tokenizer, _ = load_model(tmp_path / "tuned_e1.pth")
    old = plain_tok.vocab_size
    assert tokenizer.vocab_size == old + len(CHAT_TOKENS) == tuned.config.tgt_vocab_size
    assert torch.allclose(tuned.wte.weight[:old], plain.wte.weight, atol=1e-6)
    assert torch.allclose(tuned.wte.weight[old:], plain.wte.weight.mean(dim=0).expand(4, -1), atol=1e-5)
    prompt = encode_chat(tokenizer, [{"role": "user", "content": "what is 1+2?"}], add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|assistant|>")

    capsys.readouterr()
    assert main([*args, "--experiment_name", "bad", "--embed_dim", "64"]) == 1
    assert "--embed_dim 64 contradicts the checkpoint" in capsys.readouterr().err


def test_bad_conversation_data_is_one_line_through_the_cli(chat_files, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(0), '{"messages": [{"role": "user", "content": "x"}]}'])
    args = ["train", "--task", "chat", "--tokenizer", str(chat_files / "tok"), "--train_data", str(bad), *TINY_MODEL,
            "--max_steps", "1", "--checkpoint_dir", str(tmp_path), "--log_dir", str(tmp_path / "runs"),
            "--no_progress"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl line 2: the conversation ends with a user message" in err
    assert not list(tmp_path.glob("*.pth"))
    assert main([*args, "--skip_bad_lines"]) == 0
    assert "warning: " in capsys.readouterr().err and list(tmp_path.glob("*.pth"))
    assert main([*args, "--model", "transformer"]) == 1
    assert "drop --model transformer" in capsys.readouterr().err
