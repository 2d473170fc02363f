"""Write the synthetic conversations of `make demo-chat`: train.jsonl, valid.jsonl and test.jsonl.

Three kinds of question, each with one exact answer:
    what is 38 + 57?                     -> 95        (sums of two numbers 0..99)
    which is larger, 38 or 57?           -> 57
    write "honour" in capitals.          -> HONOUR    (words of the plays, toy_data/tiny_sp_train.txt)
A third of the conversations open with a system message, a third hold an earlier question and
its answer before the last one. The held-out files ask only questions (number pairs, words)
that no training conversation asks, so a right answer is computed, not remembered.

    python toy_data/chat/make_conversations.py --out runs/demo-chat/data   # seeded: always the same files
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "tiny_sp_train.txt"
SYSTEM_PROMPTS = ["answer briefly.", "you are a helpful assistant.", "reply with the answer only."]
SIZES = {"train": 12_000, "valid": 200, "test": 400}


def questions(rng: random.Random, pairs: list[tuple[int, int]], words: list[str]):
    """An endless stream of (question, answer) drawn from the given number pairs and words."""
    while True:
        kind = rng.randrange(3)
        a, b = rng.choice(pairs)
        if kind == 0:
            yield f"what is {a} + {b}?", str(a + b)
        elif kind == 1:
            yield f"which is larger, {a} or {b}?", str(max(a, b))
        else:
            word = rng.choice(words)
            yield f'write "{word}" in capitals.', word.upper()


def conversations(rng: random.Random, pairs, words, count: int) -> list[dict]:
    stream = questions(rng, pairs, words)
    out = []
    for i in range(count):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        if i % 3 == 1:  # an earlier turn: the loss learns its answer too, the test scores the last one
            question, answer = next(stream)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        question, answer = next(stream)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write train.jsonl, valid.jsonl and test.jsonl to")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(20)
    words = sorted({w for w in re.findall(r"[a-z]+", CORPUS.read_text(encoding="utf-8")) if 3 <= len(w) <= 8})
    rng.shuffle(words)
    pairs = [(a, b) for a in range(100) for b in range(100) if a != b]
    rng.shuffle(pairs)
    held_words, held_pairs = len(words) // 10, len(pairs) // 10  # 10 % of each, never in training
    splits = {
        "train": (pairs[held_pairs:], words[held_words:]),
        "valid": (pairs[:held_pairs], words[:held_words]),
        "test": (pairs[:held_pairs], words[:held_words]),
    }
    for name, (split_pairs, split_words) in splits.items():
        lines = conversations(rng, split_pairs, split_words, SIZES[name])
        text = "".join(json.dumps(line) + "\n" for line in lines)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(f'{n} {name}' for name, n in SIZES.items())} conversations to {out}")


if __name__ == "__main__":
    main()
