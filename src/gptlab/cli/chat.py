"""`gptlab chat`: a conversation with a chat-tuned GPT in the terminal.

Each line read is a user message; the assistant's answer streams out as it is generated and
joins the conversation, which the next answer sees. `/reset` forgets the conversation,
`/system TEXT` sets the system message, `/quit` or end of input (Ctrl-D) leaves; Ctrl-C stops
the answer being written (what was written stays in the conversation).

cli.py registers it with one line in build_parser: `add_chat_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from gptlab.cli.common import add_weights_dtype_flag, load_for_generation
from gptlab.config import SampleConfig, validated
from gptlab.errors import GptlabError
from gptlab.generation import Piece, answer_end_ids, sample_events
from gptlab.models import GPT
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import encode_chat, has_chat_template

CHAT_HELP = (
    "Type a message and press Enter. /reset forgets the conversation, /system TEXT sets the system message, "
    "/quit or Ctrl-D leaves; Ctrl-C stops an answer."
)
COMMANDS = ("/reset", "/system", "/quit")
SAMPLE_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    """`gptlab chat --model_path X [--system TEXT] [sampling flags]`."""
    parser = subparsers.add_parser(
        "chat",
        help="talk with a chat-tuned GPT in the terminal",
        description=f"A multi-turn conversation with a checkpoint that has a chat template "
        f"(gptlab train --task chat). {CHAT_HELP}",
    )
    parser.add_argument(
        "--model_path",
        required=True,
        help="a .pth checkpoint written by gptlab train, or a directory written by gptlab export --format safetensors",
    )
    parser.add_argument("--system", help="the system message that starts the conversation (default: none)")
    defaults = {"max_new_tokens": 256, "temperature": 0.8}  # an answer, not a page of text
    for name in SAMPLE_FLAGS:
        field = SampleConfig.model_fields[name]
        kind = int if name in ("max_new_tokens", "top_k", "seed") else float
        default = defaults.get(name, field.default)
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{field.description} (default: {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    add_weights_dtype_flag(parser)
    parser.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> None:
    cfg = validated(SampleConfig, {name: getattr(args, name) for name in SAMPLE_FLAGS})
    model, tokenizer = load_for_generation(args.model_path, args.device, args.dtype)
    if not has_chat_template(tokenizer):
        raise GptlabError(
            f"{args.model_path} has no chat template (its tokenizer has no <|user|> <|assistant|> markers); "
            "fine-tune it with `gptlab train --task chat`, or use `gptlab generate --interactive`"
        )
    run_chat(model, tokenizer, cfg, system=args.system)


def run_chat(
    model: GPT,
    tokenizer: Tokenizer,
    cfg: SampleConfig,
    system: str | None = None,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
) -> None:
    """Read messages in a loop and stream each answer to `output` (see the module's docstring).

    End of input, `/quit` or Ctrl-C at the prompt ends the loop.
    """
    if input_fn is input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    cfg = cfg.model_copy(update={"num_samples": 1})
    turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
    output.write(CHAT_HELP + "\n")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return
        command, _, rest = line.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            turns.clear()
            output.write("[conversation cleared]\n")
        elif command == "/system":
            system = rest.strip() or None
            output.write("[system message set]\n" if system else "[system message removed]\n")
        elif command.startswith("/") and command[1:].isalpha():
            output.write(f"[unknown command {command}; the commands are {', '.join(COMMANDS)}]\n")
        elif line.strip():
            turns.append({"role": "user", "content": line})
            answer = stream_answer(model, tokenizer, cfg, system, turns, output)
            turns.append({"role": "assistant", "content": answer})
        output.flush()


def stream_answer(
    model: GPT,
    tokenizer: Tokenizer,
    cfg: SampleConfig,
    system: str | None,
    turns: list[dict[str, str]],
    output: TextIO,
) -> str:
    """Write the assistant's answer to the conversation as it is generated; return its text.
    Drops the oldest turns from `turns` when the conversation outgrows the model's context."""
    seq_len = model.config.seq_len
    # Room for the answer before the generator has to slide its window (and forget the start).
    budget = seq_len - min(cfg.max_new_tokens, seq_len // 2)
    ids, dropped = fit_conversation(tokenizer, system, turns, budget)
    if dropped:
        output.write(f"[the conversation outgrew the model's context: forgot its {dropped} oldest messages]\n")
    if len(ids) > seq_len:
        output.write(f"[the message is {len(ids)} tokens; the model reads its last {seq_len}]\n")
        ids = ids[-seq_len:]
    events = sample_events(model, tokenizer, [ids], cfg, end_ids=answer_end_ids(tokenizer))
    answer = ""
    try:
        for event in events:
            if isinstance(event, Piece):
                answer += event.text
                output.write(event.text)
                output.flush()
    except KeyboardInterrupt:
        output.write(" [stopped]")
    finally:
        events.close()
    output.write("\n")
    return answer


def fit_conversation(
    tokenizer: Tokenizer, system: str | None, turns: list[dict[str, str]], budget: int
) -> tuple[list[int], int]:
    """The prompt ids of the system message and `turns` (ending with the assistant's marker),
    and how many of the oldest turns were removed from `turns` to bring it within `budget` ids.
    The last message is always kept, however long."""
    dropped = 0
    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
        if len(ids) <= budget or len(turns) <= 1:
            return ids, dropped
        del turns[0]  # a user message, then its answer: the conversation keeps starting with the user
        dropped += 1
        if turns and turns[0]["role"] == "assistant":
            del turns[0]
            dropped += 1
