"""`gptlab eval`: loss, perplexity and bits per byte of a GPT on text, or its multiple-choice
accuracy (multiple_choice.py)."""

from __future__ import annotations

import argparse

from gptlab.cli.chat_eval import add_chat_eval_flags, run_chat_eval
from gptlab.cli.common import add_device_flag
from gptlab.cli.multiple_choice import add_multiple_choice_flags, run_multiple_choice
from gptlab.errors import GptlabError


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a GPT on some text, or its multiple-choice accuracy",
        description="Evaluate a GPT on text: mean loss, perplexity and bits per byte (comparable across tokenizers); "
        "or with --task multiple_choice, accuracy and length-normalised accuracy on a JSONL file of questions "
        "(HellaSwag's format or {context, choices, answer}), scored as lm-evaluation-harness scores them; "
        "or with --task chat, how many held-out conversations' last answers the model gives exactly (greedy).",
    )
    parser.add_argument(
        "--model_path",
        required=True,
        help="a .pth checkpoint written by gptlab train, or a directory written by gptlab export --format safetensors "
        "(--task multiple_choice also takes a Hugging Face GPT-2 directory)",
    )
    parser.add_argument(
        "--task", default="lm", choices=["lm", "multiple_choice", "chat"], help="what to measure (default: lm)"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="lm: a .txt file, a directory of them, or a prepared directory; multiple_choice, chat: a .jsonl file",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=32,
        help="windows (lm) or choices (multiple_choice) per batch (default: %(default)s)",
    )
    parser.add_argument("--max_batches", type=int, help="lm: evaluate on at most this many batches (default: all)")
    add_device_flag(parser)
    add_multiple_choice_flags(parser)
    add_chat_eval_flags(parser)
    parser.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    if args.task == "multiple_choice":
        return run_multiple_choice(args)
    if args.task == "chat":
        return run_chat_eval(args)
    if args.output:
        raise GptlabError("--output is for --task multiple_choice; drop it")
    from gptlab.data import TokenDataset, resolve_data
    from gptlab.device import resolve_device
    from gptlab.loading import load
    from gptlab.training import evaluate

    device = resolve_device(args.device)
    loaded = load(args.model_path, device, model_type="gpt")
    model, tokenizer = loaded.model, loaded.tokenizer
    dataset = TokenDataset(resolve_data(args.data, tokenizer), model.config.seq_len)
    result = evaluate(model, dataset, args.batch_size, args.max_batches, device)
    print(
        f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
        f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens:,} tokens)"
    )
