"""`gptlab eval --task multiple_choice`: accuracy of a GPT on a multiple-choice JSONL file.

eval.py owns the `eval` parser; it adds these flags with `add_multiple_choice_flags` and hands
--task multiple_choice to `run_multiple_choice`. The scoring itself is training/multiple_choice.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer

GPT2_SEPARATOR = "<|endoftext|>"


def add_multiple_choice_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--task multiple_choice")
    group.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="also write each item's choice log-likelihoods and picks here (one JSON object per item)",
    )


def is_hf_directory(path: str | Path) -> bool:
    """A directory with a config.json that gptlab's safetensors export did not write: Hugging Face's."""
    from gptlab.interop.safetensors_io import FORMAT

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return True  # the importer names what is wrong with it
    return not (isinstance(values, dict) and values.get("format") == FORMAT)


def load_scoring_model(path: str, device) -> tuple[Any, Tokenizer, list[int], int]:
    """The model and tokenizer at `path` (a .pth checkpoint, a safetensors export or a Hugging Face
    GPT-2 directory), the ids to leave out of the softmax, and the id an empty context stands for.

    A Hugging Face GPT-2 gains rows for our four special tokens on import (interop/hf_import.py);
    leaving them out keeps the softmax over GPT-2's own ids, so scores equal transformers'.
    """
    if is_hf_directory(path):
        from gptlab.interop.hf_import import init_model_from_hf

        model, tokenizer, _ = init_model_from_hf(path)
        added = [tokenizer.special_tokens[token] for token in SPECIAL_TOKENS]
        return model.to(device), tokenizer, added, tokenizer.special_tokens.get(GPT2_SEPARATOR, tokenizer.eos_id)
    from gptlab.loading import load

    loaded = load(path, device, model_type="gpt")
    return loaded.model, loaded.tokenizer, [], loaded.tokenizer.eos_id


def run_multiple_choice(args: argparse.Namespace) -> None:
    from gptlab.device import resolve_device
    from gptlab.training.multiple_choice import ChoiceTask

    if args.max_batches is not None:
        raise GptlabError("--max_batches is for --task lm; every question is scored (give a shorter file)")
    if args.batch_size < 1:
        raise GptlabError(f"--batch_size must be at least 1, got {args.batch_size}")
    output = Path(args.output) if args.output else None
    if output is not None and not output.parent.is_dir():
        raise GptlabError(f"--output {output}: directory {output.parent} does not exist; create it first")
    from gptlab.data.choice_files import read_choice_file

    items = read_choice_file(args.data)  # a bad file fails before the slow model load
    device = resolve_device(args.device)
    model, tokenizer, exclude, prefix = load_scoring_model(args.model_path, device)
    task = ChoiceTask(items, tokenizer, model.config.seq_len, prefix, source=args.data)
    started = time.perf_counter()
    result = task.evaluate(model, args.batch_size, device, exclude_ids=exclude, progress=True)
    seconds = time.perf_counter() - started
    if output is not None:
        lines = [
            json.dumps({"line": item.line, "answer": item.answer, "loglikelihoods": lls,
                        "prediction": pred, "prediction_norm": pred_norm})
            for item, lls, pred, pred_norm in zip(task.items, result.loglikelihoods, result.predictions,
                                                  result.predictions_norm)
        ]  # fmt: skip
        write_atomic(output, ("\n".join(lines) + "\n").encode("utf-8"))
    print(
        f"acc {result.acc:.4f} ± {result.acc_stderr:.4f}  acc_norm {result.acc_norm:.4f} ± "
        f"{result.acc_norm_stderr:.4f}  ({result.items:,} items, {len(task.requests):,} choices, {seconds:.1f} s)"
    )
    if output is not None:
        print(f"per-item scores written to {output}")
