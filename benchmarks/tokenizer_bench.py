"""Tokenizer benchmark: gptlab's byte-level BPE side by side with its peers, in one run.

    python benchmarks/tokenizer_bench.py [--data PATH] [--val PATH] [--repeats N]

Prints Markdown tables (paste them into BENCHMARKS.md):
  1. training time at vocab 4096 and 16384: ours vs Hugging Face `tokenizers` (ByteLevel BPE)
     vs sentencepiece BPE, with the ratio ours / HF;
  2. linear scaling: ours on a quarter of the corpus vs the whole;
  3. minbpe's RegexTokenizer at vocab 512 on val.txt, if it is importable (it is not on PyPI);
  4. compression on val.txt (UTF-8 bytes per token): ours vs HF at the same vocab size;
  5. encoding throughput on the corpus: our encode() vs raw tiktoken on the same ranks, and our
     pure-Python reference encoder.
Every time is the best of --repeats runs: the machine may be shared, and the best run is the
one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import tiktoken

from gptlab.tokenizers.base import SPECIAL_TOKENS
from gptlab.tokenizers.bpe import BPETokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "shakespeare" / "train.txt"


def best_of(repeats: int, run) -> tuple[float, object]:
    """The shortest wall time of `repeats` calls of run(), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


# ---- the trainers ----------------------------------------------------------------------------
def train_ours(texts: list[str], vocab_size: int, pattern: str = "gpt4") -> BPETokenizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a quarter of a small corpus may fall short of vocab_size
        return BPETokenizer.train(texts, vocab_size, pattern=pattern, progress=False)


def train_hf(path: Path, vocab_size: int):
    """Hugging Face ByteLevel BPE (GPT-2 pre-tokenizer), same total vocab size as ours."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(path)], trainer)
    return tokenizer


def train_sentencepiece(path: Path, vocab_size: int) -> None:
    import sentencepiece

    with tempfile.TemporaryDirectory() as directory:
        sentencepiece.SentencePieceTrainer.train(
            input=str(path),
            model_prefix=f"{directory}/spm",
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=2,
            minloglevel=2,
        )


def optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


# ---- the sections ----------------------------------------------------------------------------
def training_table(path: Path, text: str, repeats: int) -> dict[int, tuple]:
    """Prints the table; returns vocab size -> (ours gpt4, ours gpt2, HF) tokenizers."""
    hf, spm = optional("tokenizers"), optional("sentencepiece")
    print("### Training time (s)\n")
    print(
        "| vocab | ours (gpt4 split) | ours (gpt2 split) | HF tokenizers | sentencepiece BPE | ours gpt4 / HF | ours gpt2 / HF |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    trained = {}
    for vocab_size in (4096, 16384):
        ours4, tok4 = best_of(repeats, lambda: train_ours([text], vocab_size, "gpt4"))
        ours2, tok2 = best_of(repeats, lambda: train_ours([text], vocab_size, "gpt2"))
        hf_time, hf_tok = best_of(repeats, lambda: train_hf(path, vocab_size)) if hf else (float("nan"), None)
        spm_time, _ = best_of(repeats, lambda: train_sentencepiece(path, vocab_size)) if spm else (float("nan"), None)
        trained[vocab_size] = (tok4, tok2, hf_tok)
        print(
            f"| {vocab_size} | {ours4:.2f} | {ours2:.2f} | {hf_time:.2f} | {spm_time:.2f} | {ours4 / hf_time:.2f} | {ours2 / hf_time:.2f} |"
        )
    print()
    return trained


def scaling_table(text: str, vocab_size: int, repeats: int) -> None:
    """Four different quarters vs the whole: repeating one quarter would keep the unique chunks."""
    quarter = len(text) // 4
    quarter_times = [
        best_of(repeats, lambda: train_ours([text[i * quarter : (i + 1) * quarter]], vocab_size))[0] for i in range(4)
    ]
    whole, _ = best_of(repeats, lambda: train_ours([text], vocab_size))
    median = statistics.median(quarter_times)
    print(f"### Linear scaling (ours, vocab {vocab_size})\n")
    print("| text | time (s) |\n|---|---:|")
    print(f"| 1/4 of the corpus (median of the 4 quarters) | {median:.2f} |")
    print(f"| the whole corpus (4x the text) | {whole:.2f} |")
    print(f"| ratio whole / quarter (linear = 4.0) | {whole / median:.2f} |\n")


def minbpe_table(val: str, repeats: int) -> None:
    print("### minbpe RegexTokenizer, vocab 512 on val.txt\n")
    ours, _ = best_of(repeats, lambda: train_ours([val], 512))
    try:
        from minbpe import RegexTokenizer
    except ImportError:
        print(f"ours: {ours:.2f} s; minbpe not installed (not on PyPI)\n")
        return
    theirs, _ = best_of(1, lambda: RegexTokenizer().train(val, 512 - len(SPECIAL_TOKENS)))
    print("| ours (s) | minbpe (s) | minbpe / ours |\n|---:|---:|---:|")
    print(f"| {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f} |\n")


def compression_table(val: str, trained: dict[int, tuple]) -> None:
    """HF's ByteLevel pre-tokenizer splits like the GPT-2 pattern, so ours (gpt2) is the like-for-like row."""
    n_bytes = len(val.encode("utf-8"))
    print("### Compression on val.txt (UTF-8 bytes per token; higher is better)\n")
    print("| vocab | ours (gpt4 split) | ours (gpt2 split) | HF tokenizers (gpt2 split) | ours gpt2 / HF |")
    print("|---:|---:|---:|---:|---:|")
    for vocab_size, (ours4, ours2, hf_tok) in trained.items():
        bpt4, bpt2 = n_bytes / len(ours4.encode(val)), n_bytes / len(ours2.encode(val))
        hf_bpt = n_bytes / len(hf_tok.encode(val).ids) if hf_tok else float("nan")
        print(f"| {vocab_size} | {bpt4:.3f} | {bpt2:.3f} | {hf_bpt:.3f} | {bpt2 / hf_bpt:.3f} |")
    print()


def encode_table(text: str, tokenizer: BPETokenizer, repeats: int) -> None:
    megabytes = len(text.encode("utf-8")) / 1e6
    ranks = {tokenizer.token_bytes(i): i for i in range(tokenizer.vocab_size - len(SPECIAL_TOKENS))}
    raw = tiktoken.Encoding(name="raw", pat_str=tokenizer.pattern, mergeable_ranks=ranks, special_tokens={})
    raw_time, raw_ids = best_of(repeats, lambda: raw.encode_ordinary(text))
    ours_time, ours_ids = best_of(repeats, lambda: tokenizer.encode(text))
    # A fresh tokenizer per run, so that the reference encoder starts with an empty chunk cache.
    ref_time, ref_ids = best_of(1, lambda: BPETokenizer(tokenizer.merges, tokenizer.pattern).encode_reference(text))
    assert ours_ids == raw_ids == ref_ids, "the encoders disagree"
    print(f"### Encoding throughput on the corpus ({megabytes:.1f} MB, vocab {tokenizer.vocab_size})\n")
    print("| encoder | MB/s | vs raw tiktoken |\n|---|---:|---:|")
    print(f"| raw tiktoken on our ranks (encode_ordinary) | {megabytes / raw_time:.1f} | 1.00 |")
    print(f"| ours: encode() | {megabytes / ours_time:.1f} | {raw_time / ours_time:.2f} |")
    print(f"| ours: encode_reference() (pure Python) | {megabytes / ref_time:.2f} | {raw_time / ref_time:.3f} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="training corpus (UTF-8 text)")
    parser.add_argument("--val", type=Path, default=None, help="held-out text (default: val.txt beside --data)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is kept")
    args = parser.parse_args()
    val_path = args.val or args.data.with_name("val.txt")
    for path in (args.data, val_path):
        if not path.is_file():
            sys.exit(f"{path} not found; pass --data/--val")
    text, val = args.data.read_text(encoding="utf-8"), val_path.read_text(encoding="utf-8")

    print(f"corpus {args.data} ({len(text.encode()) / 1e6:.2f} MB), val {val_path.name}; best of {args.repeats}\n")
    trained = training_table(args.data, text, args.repeats)
    scaling_table(text, 16384, args.repeats)
    minbpe_table(val, args.repeats)
    compression_table(val, trained)
    encode_table(text, trained[16384][0], args.repeats)


if __name__ == "__main__":
    main()
