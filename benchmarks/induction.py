"""In-context copying: does a model predict a sequence better the second time it reads it?

    python benchmarks/induction.py CHECKPOINT [CHECKPOINT ...] [--length 100] [--sequences 16]

A model that has learned to copy from earlier in its context (an "induction head": find where the
current token occurred before and predict what followed it there) predicts a sequence it has just
read far better than a fresh one. Each window holds two sequences of `length` tokens in a row: the
second is either the first again (repeated) or another one (fresh), so both are read after the same
amount of context. Two kinds of sequence:

- random token ids (special tokens excluded), where nothing but copying helps: a fresh one costs
  about ln(vocabulary) nats a token or more, a repeated one close to 0 if the model copies and the
  same as a fresh one if it does not;
- windows of the validation text, where a fresh one is predicted as text is and copying takes a
  repeated one further down.

One row per checkpoint: the mean loss in nats over the second sequence's tokens after its first
(the first token of a sequence cannot be foreseen), fresh and repeated, and what repeating gains.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.errors import GptlabError
from gptlab.training import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun import ROOT  # noqa: E402
from speedrun import main as run_main  # noqa: E402

VAL_TEXT = ROOT / "data" / "shakespeare" / "val.txt"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="GPT checkpoints (.pth) to read")
    parser.add_argument("--length", type=int, default=100, help="tokens in each copy (default: %(default)s)")
    parser.add_argument("--sequences", type=int, default=16, help="sequences of each kind (default: %(default)s)")
    parser.add_argument("--val_data", type=Path, default=VAL_TEXT, help="text the real sequences come from")
    parser.add_argument("--seed", type=int, default=0, help="which sequences (default: %(default)s)")
    return parser


def copy_losses(model: torch.nn.Module, sequences: torch.Tensor) -> tuple[float, float]:
    """Mean loss (nats) over the second of two sequences (S, L) read in a row, when it is another
    of them (fresh) and when it is the first again (repeated)."""
    length = sequences.shape[1]
    fresh = torch.cat([sequences.roll(1, dims=0), sequences], dim=1)  # (S, 2L)
    repeated = torch.cat([sequences, sequences], dim=1)
    return second_sequence_loss(model, fresh, length), second_sequence_loss(model, repeated, length)


def second_sequence_loss(model: torch.nn.Module, windows: torch.Tensor, length: int) -> float:
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    losses = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")  # (S, 2L-1)
    return losses[:, length:].mean().item()  # losses[:, t] is token t + 1's: the second's L+1 .. 2L-1


def random_sequences(vocab_size: int, special_ids: set[int], count: int, length: int, seed: int) -> torch.Tensor:
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in special_ids])
    picks = torch.randint(len(ordinary), (count, length), generator=torch.Generator().manual_seed(seed))
    return ordinary[picks]


def text_sequences(ids: list[int], count: int, length: int, seed: int) -> torch.Tensor:
    if len(ids) < length:
        raise GptlabError(f"the validation text has {len(ids)} tokens, fewer than --length {length}")
    starts = torch.randint(len(ids) - length + 1, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.tensor([ids[start : start + length] for start in starts.tolist()])


def run(args: argparse.Namespace) -> list[str]:
    if args.length < 2 or args.sequences < 2:
        raise GptlabError("--length and --sequences must be at least 2")
    if not args.val_data.is_file():
        raise GptlabError(f"{args.val_data} does not exist; pass the validation text with --val_data")
    text = args.val_data.read_text(encoding="utf-8")
    rows = [
        f"Each copy {args.length} tokens, {args.sequences} sequences of each kind, seed {args.seed}; "
        "loss in nats a token over the second sequence of a window (fresh / repeated, and what repeating gains).",
        "",
        "| checkpoint | ln(vocab) | random: fresh / repeated | gain | text: fresh / repeated | gain |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path in args.checkpoints:
        model, tokenizer, checkpoint = load_model(path)
        if 2 * args.length - 1 > checkpoint.model_config.seq_len:
            raise GptlabError(
                f"{path} reads {checkpoint.model_config.seq_len} tokens at a time; two copies of --length "
                f"{args.length} need {2 * args.length - 1}: pass a smaller --length"
            )
        special = set(tokenizer.special_tokens.values())
        kinds = (
            random_sequences(tokenizer.vocab_size, special, args.sequences, args.length, args.seed),
            text_sequences(tokenizer.encode(text), args.sequences, args.length, args.seed),
        )
        cells = []
        for sequences in kinds:
            fresh, repeated = copy_losses(model, sequences)
            cells += [f"{fresh:.2f} / {repeated:.2f}", f"{fresh - repeated:.2f}"]
        rows.append(f"| {path} | {math.log(tokenizer.vocab_size):.2f} | {' | '.join(cells)} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run; a GptlabError is one line on stderr and exit status 1."""
    return run_main(argv, build_parser(), run)


if __name__ == "__main__":
    sys.exit(main())
