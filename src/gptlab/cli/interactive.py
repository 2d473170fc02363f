"""`gptlab generate --interactive`: read prompts in a loop and stream each answer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from gptlab.config import SampleConfig
from gptlab.generation import stream_text
from gptlab.models import GPT
from gptlab.tokenizers.base import Tokenizer

INTERACTIVE_HELP = "Type a prompt and press Enter. Ctrl-C stops an answer; an empty line or Ctrl-D quits."


def run_interactive(
    model: GPT,
    tokenizer: Tokenizer,
    cfg: SampleConfig,
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
) -> None:
    """Read prompts in a loop and stream each one's continuation (after the prompt) to `output`.

    An empty line, end of input (Ctrl-D) or Ctrl-C at the prompt ends the loop; Ctrl-C during
    an answer stops that answer only.
    """
    if input_fn is input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    output.write(INTERACTIVE_HELP + "\n")
    while True:
        try:
            prompt = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            return
        if not prompt.strip():
            return
        output.write(prompt)
        answer = stream_text(model, tokenizer, prompt, cfg, notice=lambda note: output.write(f"\n[note: {note}]\n"))
        try:
            for piece in answer:
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [stopped]")
        finally:
            answer.close()
        output.write("\n\n")
        output.flush()
