"""`gptlab eval --task chat`: a short transcript and the exact-answer rate of a chat model on
held-out conversations (JSONL, the format `train --task chat` reads).

cli.py owns the `eval` parser; it adds these flags with `add_chat_eval_flags` and hands
--task chat to `run_chat_eval`. The answering itself is training/chat_eval.py.
"""

from __future__ import annotations

import argparse
import time

from gptlab.errors import GptlabError


def add_chat_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--task chat")
    group.add_argument(
        "--show", type=int, default=5, metavar="N", help="print the first N conversations and answers (default: 5)"
    )


def run_chat_eval(args: argparse.Namespace) -> None:
    from gptlab.data.conversations import read_conversations
    from gptlab.device import resolve_device
    from gptlab.loading import load
    from gptlab.training.chat_eval import answer_conversations

    if args.output or args.max_batches is not None:
        raise GptlabError("--output and --max_batches are for the other tasks; drop them")
    if args.show < 0:
        raise GptlabError(f"--show must be 0 or more, got {args.show}")
    conversations = read_conversations(args.data)  # before the slow load: a bad file fails at once
    device = resolve_device(args.device)
    loaded = load(args.model_path, device, model_type="gpt")
    model, tokenizer = loaded.model, loaded.tokenizer
    started = time.perf_counter()
    answers = answer_conversations(model.eval(), tokenizer, conversations, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    for answer in answers[: args.show]:
        for message in answer.prompt:
            print(f"{message['role']}: {message['content']}")
        verdict = "(exact)" if answer.exact else f"(expected {answer.reference!r})"
        print(f"assistant: {answer.answer}{'' if answer.ended else ' ...'}  {verdict}\n")
    exact = sum(answer.exact for answer in answers)
    print(f"exact answers: {exact}/{len(answers)} ({exact / len(answers):.1%}) in {seconds:.1f} s")
