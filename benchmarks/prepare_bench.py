"""Prepare benchmark: `gptlab prepare` on a corpus of hundreds of MB, peak memory and throughput.

    python benchmarks/prepare_bench.py [--mb 300] [--workers 1 2] [--tokenizer toy_data/tiny_sp]

Builds a corpus under a temporary directory (deleted afterwards) by drawing lines of
Shakespeare's train.txt with a seeded RNG: one big file of half the size, to show that a single
file is read in pieces, and a directory tree of 5 MB files for the rest. Then, each in a fresh
process so that peak memory is its own:
  - the peer: nanoGPT's way (read every file whole, tokenize it in one call, keep all ids in a
    list and write them at the end), the usual from-scratch `prepare.py`;
  - gptlab's prepare() with each --workers count.
Prints a Markdown table: MB/s, CPU seconds (self + workers), peak RSS of the main process (above
what its imports take) and of the largest worker, and ratios to the peer. The outputs' token counts must agree, or the script fails.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "data" / "shakespeare" / "train.txt"
MB = 2**20
TREE_FILE_MB = 5


def build_corpus(source: Path, root: Path, total_mb: int, seed: int = 0) -> None:
    """`total_mb` MB of shuffled source lines: big.txt (half) and tree/<k>/<n>.txt (5 MB each)."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    mean_line = sum(map(len, lines)) / len(lines)

    def write_file(path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as file:
            written = 0
            while written < size:
                block = "".join(lines[i] for i in rng.integers(0, len(lines), int(MB / mean_line)))
                file.write(block)
                written += len(block)

    write_file(root / "big.txt", total_mb * MB // 2)
    for n in range(total_mb // 2 // TREE_FILE_MB):
        write_file(root / "tree" / f"{n % 7}" / f"{n:03d}.txt", TREE_FILE_MB * MB)


def run_case(case: str, corpus: Path, tokenizer_path: str, out: Path) -> dict:
    """Run one case in this process and return its figures (called in a fresh child process)."""
    from gptlab.data import prepare, read_meta
    from gptlab.data.sources import source_files
    from gptlab.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(None, tokenizer_path)
    files = source_files([corpus])
    size = sum(p.stat().st_size for p in files)
    baseline_mb = current_rss_mb()  # imports (torch among them) before any work
    start = time.perf_counter()
    if case == "peer":
        ids = []  # the same tokenizer (tiktoken's engine on our ranks): only the pipeline differs
        for path in files:
            ids.extend(tokenizer.encode(path.read_text(encoding="utf-8")))
            ids.append(tokenizer.eos_id)
        out.mkdir()
        np.array(ids, dtype=np.uint16).tofile(out / "tokens.bin")
        num_tokens = len(ids)
    else:
        workers = int(case.split("=")[1])
        prepare([corpus], tokenizer, out, progress=False, workers=workers)
        num_tokens = read_meta(out)["num_tokens"]
    seconds = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return {
        "case": case,
        "mb_per_s": size / MB / seconds,
        "seconds": seconds,
        "cpu_seconds": sum(u.ru_utime + u.ru_stime for u in usage),
        "baseline_mb": baseline_mb,
        "main_rss_mb": usage[0].ru_maxrss / 1024,  # Linux reports KiB
        "worker_rss_mb": usage[1].ru_maxrss / 1024,  # the largest worker (children are waited for)
        "num_tokens": num_tokens,
        "corpus_mb": size / MB,
    }


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_in_child(case: str, corpus: Path, tokenizer: str, out: Path) -> dict:
    command = [sys.executable, __file__, "--case", case, "--corpus", str(corpus), "--tokenizer", tokenizer]
    command += ["--out", str(out)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="text whose lines make the corpus")
    parser.add_argument("--mb", type=int, default=300, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default=str(ROOT / "toy_data" / "tiny_sp"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.corpus, args.tokenizer, args.out)))
        return

    work = Path(tempfile.mkdtemp(prefix="gptlab-prepare-bench-"))
    try:
        start = time.perf_counter()
        build_corpus(args.data, work / "corpus", args.mb)
        print(f"corpus: {args.mb} MB in {time.perf_counter() - start:.0f} s, cpus: {os.cpu_count()}", file=sys.stderr)
        cases = ["peer", *(f"workers={n}" for n in args.workers)]
        results = []
        for case in cases:
            results.append(run_in_child(case, work / "corpus", args.tokenizer, work / "out"))
            print(f"{case}: {results[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if len({r["num_tokens"] for r in results}) != 1:
        sys.exit(f"token counts differ between cases: {[r['num_tokens'] for r in results]}")
    peer = results[0]
    corpus = f"{peer['corpus_mb']:.0f} MB corpus, {peer['num_tokens']:,} tokens"
    print(f"\nprepare, {corpus}, tokenizer {Path(args.tokenizer).name}, {os.cpu_count()} CPUs\n")
    print(
        f"Main process: peak RSS above the {peer['baseline_mb']:.0f} MB its imports (torch) take before any work. "
        "Workers: their whole peak RSS, pages shared with the main process at fork included.\n"
    )
    print("| case | MB/s | vs peer | CPU s | peak RSS main (MB) | peak RSS largest worker (MB) | main RSS vs peer |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        main_mb, worker_mb = r["main_rss_mb"] - r["baseline_mb"], r["worker_rss_mb"]
        peer_mb = peer["main_rss_mb"] - peer["baseline_mb"]
        print(
            f"| {r['case']} | {r['mb_per_s']:.1f} | {r['mb_per_s'] / peer['mb_per_s']:.2f}x | {r['cpu_seconds']:.0f} "
            f"| {main_mb:.0f} | {worker_mb:.0f} | {main_mb / peer_mb:.2f}x |"
        )


if __name__ == "__main__":
    main()
