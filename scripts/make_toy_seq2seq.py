"""Write the toy sequence-to-sequence task into toy_data/seq2seq/: dates in words -> ISO dates.

    python scripts/make_toy_seq2seq.py [--out toy_data/seq2seq] [--train 12000] [--test 500] [--seed 0]

Each line of train.tsv / test.tsv is `<date in words><TAB><YYYY-MM-DD>`, e.g.
`the twenty-third of march, nineteen ninety-eight<TAB>1998-03-23`, written in one of several
styles (words or digits for the day and year, day or month first). No date of the test split
appears in the training split, in any style, so the test measures generalisation. A char
tokenizer of the training text goes to `tokenizer/`. The output is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import datetime
import random
from pathlib import Path

from gptlab.tokenizers import CharTokenizer

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ORDINAL_ONES = (
    "_ first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth".split()
)
ORDINAL_TENS = {20: "twentieth", 30: "thirtieth"}
MONTHS = "january february march april may june july august september october november december".split()
FIRST, LAST = datetime.date(1900, 1, 1), datetime.date(2099, 12, 31)


def cardinal(n: int) -> str:
    """0..99 in words: 7 -> seven, 42 -> forty-two."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal(n: int) -> str:
    """1..31 in words: 3 -> third, 23 -> twenty-third, 30 -> thirtieth."""
    if n < 20:
        return ORDINAL_ONES[n]
    tens, ones = divmod(n, 10)
    return f"{TENS[tens]}-{ORDINAL_ONES[ones]}" if ones else ORDINAL_TENS[n]


def year_words(year: int, rng: random.Random) -> str:
    """1998 -> nineteen ninety-eight, 1905 -> nineteen oh five, 2005 -> two thousand and five,
    2024 -> twenty twenty-four or two thousand and twenty-four."""
    century, rest = divmod(year, 100)
    if century == 20 and (rest < 10 or rng.random() < 0.5):
        return "two thousand" + (f" and {cardinal(rest)}" if rest else "")
    if rest == 0:
        return f"{cardinal(century)} hundred"
    return f"{cardinal(century)} {'oh ' if rest < 10 else ''}{cardinal(rest)}"


def date_in_words(date: datetime.date, rng: random.Random) -> str:
    """One of several ways of writing `date`, picked at random."""
    month = MONTHS[date.month - 1]
    day = ordinal(date.day) if rng.random() < 0.7 else str(date.day)
    year = year_words(date.year, rng) if rng.random() < 0.7 else str(date.year)
    style = rng.randrange(3)
    if style == 0:
        return f"the {day} of {month}, {year}"
    if style == 1:
        return f"{month} {day}, {year}"
    return f"{day} {month} {year}"


def sample_dates(count: int, rng: random.Random) -> list[datetime.date]:
    """`count` different dates between FIRST and LAST."""
    days = rng.sample(range((LAST - FIRST).days + 1), count)
    return [FIRST + datetime.timedelta(days=d) for d in days]


def write_split(path: Path, dates: list[datetime.date], rng: random.Random) -> list[str]:
    lines = [f"{date_in_words(date, rng)}\t{date.isoformat()}" for date in dates]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="toy_data/seq2seq", help="output directory (default: %(default)s)")
    parser.add_argument("--train", type=int, default=12000, help="training pairs (default: %(default)s)")
    parser.add_argument("--test", type=int, default=500, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    dates = sample_dates(args.train + args.test, rng)  # distinct, so the splits share no date
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_lines = write_split(out / "train.tsv", dates[: args.train], rng)
    write_split(out / "test.tsv", dates[args.train :], rng)
    CharTokenizer.train(line.replace("\t", "") for line in train_lines).save(out / "tokenizer")
    print(f"wrote {args.train} training and {args.test} held-out pairs, and a char tokenizer, to {out}")


if __name__ == "__main__":
    main()
