"""GGUF benchmark: llama.cpp decoding a gptlab export beside gptlab's own decoding, same weights.

    python benchmarks/gguf_bench.py [--tokens 200] [--threads N] [--repeats 3]

A GPT-2-124M-shaped gptlab GPT (12 layers x 768, 12 heads, 1024 positions, vocab 50304,
learned positions + LayerNorm + GELU, tied embeddings; random weights) is exported with
`gptlab export --format gguf` as f32 and as q8_0, and each file is run by llama.cpp through
llama-cpp-python (`pip install llama-cpp-python`, which builds llama.cpp from source).
Batch 1, a 1-token prompt, greedy, exactly --tokens new tokens:
  - gptlab: `generate_token_ids` on the fp32 model made `ready_for_generation`, as `gptlab generate` does;
  - llama.cpp: `Llama.eval` one token at a time and the argmax of its logits (the same greedy loop),
    with its weight repacking off unless --repack (on CPUs with AMX, repacked q8_0 crashed here).
Prints a Markdown table of tokens/s with ratios to gptlab. Each time is the best of --repeats runs
(the machine may be shared; the best run is the least disturbed). Both get --threads threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gptlab.config import ModelConfig, SampleConfig
from gptlab.generation import generate_token_ids, ready_for_generation
from gptlab.interop.gguf_export import export_gguf
from gptlab.models import GPT
from gptlab.tokenizers import BPETokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "val.txt"
GPT2_SMALL = dict(
    embed_dim=768,
    n_heads=12,
    num_layers=12,
    seq_len=1024,
    tgt_vocab_size=50304,
    dropout=0.0,
    bias=True,
    pos_encoding="learned",
    norm="layernorm",
    activation="gelu",
    tie_embeddings=True,
)


def run_ours(model: GPT, prompt: list[int], n: int) -> list[int]:
    cfg = SampleConfig(greedy=True, max_new_tokens=n)
    return [step[0] for step in generate_token_ids(model, [prompt], cfg, pad_id=0)]


def run_llama(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def best_time(repeats: int, run) -> tuple[float, list[int]]:
    best = (float("inf"), [])
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        best = min(best, (time.perf_counter() - start, tokens), key=lambda pair: pair[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per run (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads for both (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--repack", action="store_true", help="let llama.cpp repack weights for its CPU kernels")
    args = parser.parse_args()
    import llama_cpp

    if not args.repack:
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_repacking

    torch.set_num_threads(args.threads)
    n, prompt = args.tokens, [1]
    torch.manual_seed(0)
    model = GPT(ModelConfig(**GPT2_SMALL)).eval()
    # Any BPE fits: its ids are a few hundred of the table's 50304 rows; the rest are unused entries.
    tokenizer = BPETokenizer.train([DATA.read_text(encoding="utf-8")[:20_000]], 300, progress=False)
    print(
        f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.threads} thread(s); "
        f"GPT-2-124M shape ({model.num_params():,} parameters), batch 1, 1-token prompt, {n} new tokens, greedy, "
        f"llama.cpp repacking {'on' if args.repack else 'off'}\n"
    )

    ours = ready_for_generation(model, torch.float32)
    run_ours(ours, prompt, 10)  # warm up
    ours_s, ours_tokens = best_time(args.repeats, lambda: run_ours(ours, prompt, n))
    rows = [("gptlab (PyTorch)", "fp32", "-", n / ours_s, ours_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in ("f32", "q8_0"):
            path = Path(tmp) / f"model-{outtype}.gguf"
            export_gguf(model, tokenizer, path, outtype)
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n + len(prompt),
                n_batch=64,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                logits_all=True,
                verbose=False,
            )
            run_llama(llm, prompt, 10)  # warm up
            seconds, tokens = best_time(args.repeats, lambda llm=llm: run_llama(llm, prompt, n))
            rows.append(("llama.cpp", outtype, f"{path.stat().st_size / 2**20:,.0f} MiB", n / seconds, tokens))
            llm.close()  # free its weights before the next file

    print("| engine | weights | file | tok/s | / gptlab fp32 | same tokens as gptlab |\n|---|---|---|---|---|---|")
    for engine, weights, size, tok_s, tokens in rows:
        same = sum(a == b for a, b in zip(tokens, ours_tokens))
        print(f"| {engine} | {weights} | {size} | {tok_s:,.1f} | {tok_s * ours_s / n:.2f}x | {same}/{n} |")


if __name__ == "__main__":
    main()
