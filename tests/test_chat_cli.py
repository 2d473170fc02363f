"""`gptlab chat`: a whole conversation piped into the command (answers, /system, /reset, /quit),
Ctrl-C during an answer, a conversation that outgrows the context, and the clear errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.cli.chat import CHAT_HELP, fit_conversation, run_chat
from gptlab.cli.common import load_for_generation
from gptlab.config import DatasetConfig, SampleConfig, TrainConfig
from gptlab.tokenizers.chat import encode_chat
from gptlab.training import save_checkpoint

pytest.importorskip("fastapi", reason="the chat tests share test_serve's helpers, which need the [serve] extra")
pytest.importorskip("openai", reason="the chat tests share test_serve_chat's helpers, which need openai")
from test_serve import TOKENIZER, tiny_gpt  # noqa: E402
from test_serve_chat import CHAT_TOKENIZER, ScriptedChatModel, chat_gpt, expected_answer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def save(path: Path, model, tokenizer) -> Path:
    return save_checkpoint(path, model, tokenizer, model.config, DatasetConfig(), TrainConfig(), step=0, epoch=0)


def fake_input(*lines: str):
    """An input() that returns `lines` one by one, then signals end of input like Ctrl-D."""
    remaining = list(lines)

    def read(prompt: str) -> str:
        if not remaining:
            raise EOFError
        return remaining.pop(0)

    return read


def test_piped_conversation_streams_each_answer_with_the_history_it_has(tmp_path: Path):
    checkpoint = save(tmp_path / "chat.pth", chat_gpt(), CHAT_TOKENIZER)
    lines = [
        "Once upon a time", "/system Talk like a pirate.", "And then?", "/sytem typo", "/reset", "Hello", "",
        "/quit", "never read",
    ]  # fmt: skip
    command = [
        sys.executable, "-m", "gptlab", "chat", "--model_path", str(checkpoint), "--system", "Be brief.",
        "--temperature", "0", "--max_new_tokens", "8", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float sums as this process (one_thread)
    run = subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr

    model, tokenizer = load_for_generation(str(checkpoint), "cpu", "fp32")  # as the command loads it
    cfg = SampleConfig(max_new_tokens=8, temperature=0)

    def answer(messages: list[dict]) -> str:
        return expected_answer(model, messages, cfg)[0]

    pirate = {"role": "system", "content": "Talk like a pirate."}
    first_turn = [{"role": "user", "content": "Once upon a time"}]
    first = answer([{"role": "system", "content": "Be brief."}, *first_turn])
    second = answer(
        [pirate, *first_turn, {"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    )
    third = answer([pirate, {"role": "user", "content": "Hello"}])
    assert len({first, second, third}) == 3  # the history changes what the model says
    assert run.stdout == (
        f"{CHAT_HELP}\n> {first}\n> [system message set]\n> {second}\n"
        "> [unknown command /sytem; the commands are /reset, /system, /quit]\n> [conversation cleared]\n"
        f"> {third}\n> > "
    )


def test_ctrl_c_stops_one_answer_which_stays_in_the_conversation():
    script = CHAT_TOKENIZER.encode(" the cat sat on the mat")
    model = ScriptedChatModel(script, interrupt_after=3)
    output = io.StringIO()
    run_chat(
        model, CHAT_TOKENIZER, SampleConfig(max_new_tokens=20), input_fn=fake_input("first", "second"), output=output
    )
    partial = CHAT_TOKENIZER.decode(script[:3])
    # (fake_input does not echo the "> " prompt that input() writes)
    assert output.getvalue() == f"{CHAT_HELP}\n{partial} [stopped]\n the cat sat on the mat\n\n"
    history = [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": partial},
        {"role": "user", "content": "second"},
    ]  # fmt: skip
    assert model.prompts[1] == encode_chat(CHAT_TOKENIZER, history, add_generation_prompt=True)


def test_a_conversation_that_outgrows_the_context_forgets_its_oldest_exchanges():
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} " * 3}]
    turns.append({"role": "user", "content": "last question"})
    system = "You answer briefly."
    full = encode_chat(CHAT_TOKENIZER, [{"role": "system", "content": system}, *turns], add_generation_prompt=True)
    kept = list(turns)
    ids, dropped = fit_conversation(CHAT_TOKENIZER, system, kept, budget=len(full) // 2)
    assert 0 < dropped < len(turns) and dropped % 2 == 0  # whole exchanges
    assert kept == turns[dropped:] and kept[0]["role"] == "user"
    assert len(ids) <= len(full) // 2
    assert ids == encode_chat(
        CHAT_TOKENIZER, [{"role": "system", "content": system}, *kept], add_generation_prompt=True
    )
    # The last message stays, however long.
    alone = [{"role": "user", "content": "word " * 100}]
    ids, dropped = fit_conversation(CHAT_TOKENIZER, None, alone, budget=5)
    assert dropped == 0 and alone and len(ids) > 5


def test_model_without_a_chat_template_and_bad_flags_are_one_error_line(tmp_path: Path, capsys):
    plain = save(tmp_path / "plain.pth", tiny_gpt(), TOKENIZER)
    assert main(["chat", "--model_path", str(plain), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no chat template" in err and "--task chat" in err
    assert main(["chat", "--model_path", str(plain), "--temperature", "-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature" in err
    assert main(["chat", "--model_path", str(tmp_path / "missing.pth")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
