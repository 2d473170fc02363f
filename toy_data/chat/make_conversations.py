"""Write the synthetic conversations of `make demo-chat`: train.jsonl, valid.jsonl and test.jsonl.

Three kinds of question, each with one exact answer:
    what is 38 + 57?                     -> 95        (sums of two numbers 0..99)
    which is larger, 38 or 57?           -> 57
    write "honour" in capitals.          -> HONOUR    (words of the plays, toy_data/tiny_sp_train.txt)
A conversation asks three of them in turn, a third open with a system message, and the
loss learns every answer. Sums are the hardest to learn, so training asks them most (half the
questions, comparisons 30 %, capitals 20 %); the held-out files ask the three kinds equally, and
only questions (number pairs, words) that no training conversation asks, so a right answer is
computed, not remembered. `gptlab eval --task chat` scores the last answer of each.

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
TURNS = 3  # questions per conversation: more answers to learn from per row, rows of similar length
SIZES = {"train": 12_000, "valid": 200, "test": 400}


TRAIN_MIX = (0.5, 0.3, 0.2)  # sums, comparisons, capitals
HELD_OUT_MIX = (1 / 3, 1 / 3, 1 / 3)


def questions(rng: random.Random, pairs: list[tuple[int, int]], words: list[str], mix: tuple[float, ...]):
    """An endless stream of (question, answer) drawn from the given number pairs and words."""
    while True:
        kind = rng.choices(range(3), weights=mix)[0]
        a, b = rng.sample(rng.choice(pairs), 2)  # either order: a held-out pair is held out both ways
        if kind == 0:
            yield f"what is {a} + {b}?", str(a + b)
        elif kind == 1:
            yield f"which is larger, {a} or {b}?", str(max(a, b))
        else:
            word = rng.choice(words)
            yield f'write "{word}" in capitals.', word.upper()


def conversations(rng: random.Random, pairs, words, count: int, mix: tuple[float, ...]) -> list[dict]:
    stream = questions(rng, pairs, words, mix)
    out = []
    for i in range(count):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(TURNS):
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
    text = CORPUS.read_text(encoding="utf-8")
    words = sorted({w for w in re.findall(r"(?<![A-Za-z])[a-z]{3,8}(?![A-Za-z])", text)})  # whole lower-case words
    rng.shuffle(words)
    pairs = [(a, b) for a in range(100) for b in range(a + 1, 100)]
    rng.shuffle(pairs)
    held_words, held_pairs = len(words) // 10, len(pairs) // 10  # 10 % of each, never in training
    splits = {
        "train": (pairs[held_pairs:], words[held_words:]),
        "valid": (pairs[:held_pairs], words[:held_words]),
        "test": (pairs[:held_pairs], words[:held_words]),
    }
    for name, (split_pairs, split_words) in splits.items():
        mix = TRAIN_MIX if name == "train" else HELD_OUT_MIX
        lines = conversations(rng, split_pairs, split_words, SIZES[name], mix)
        text = "".join(json.dumps(line) + "\n" for line in lines)
        (out / f"{name}.jsonl").write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(f'{n} {name}' for name, n in SIZES.items())} conversations to {out}")


if __name__ == "__main__":
    main()
