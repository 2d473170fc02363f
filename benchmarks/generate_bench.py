"""Generation benchmark: gptlab's KV-cache decoding beside Hugging Face's, same weights, one run.

    python benchmarks/generate_bench.py [--tokens 500] [--threads N] [--repeats 5] [--device cpu]

For each model size, a random Hugging Face `GPT2LMHeadModel` (vocab 8192, 1024 positions) is
loaded into gptlab with `GPT.from_hf_gpt2`, so both decode with identical weights. Batch 1,
a 1-token prompt, greedy, exactly --tokens new tokens, with the weights in each of --dtypes
(fp32, and bf16 for both sides: rounded from the same fp32 weights). Timed:
  - gptlab: `generate_token_ids` (preallocated KV cache, sampling on the device) on the model
    made `ready_for_generation`, as `gptlab generate --dtype D` does;
  - HF: `model.generate(use_cache=True, do_sample=False, max_new_tokens=N, min_new_tokens=N)`;
  - gptlab without cache: every step a forward pass over the whole text (the naive loop);
and gptlab's linear-layer floor: the speed of a step that did nothing but gptlab's products of
one token's vector by every weight matrix, which at batch 1 read all the weights every token.
On CPU, a second table times that product for each kind of matrix of the larger model: as
nn.Linear, stored (in, out), and as gptlab's MatVecLinear.
Prints a Markdown table of tokens/s with ratios. Each time is the best of --repeats runs (the
machine may be shared; the best run is the least disturbed). Both sides get the same number of
threads: all cores by default, as torch sets it.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from gptlab.config import ModelConfig, SampleConfig
from gptlab.device import DTYPES
from gptlab.generation import generate_token_ids, ready_for_generation
from gptlab.models import GPT
from gptlab.models.matvec import MatVecLinear

VOCAB, POSITIONS = 8192, 1024
SIZES = [(4, 128, 4), (6, 384, 6)]  # (layers, width, heads)


def make_models(layers: int, width: int, heads: int, device: torch.device):
    """A random HF GPT-2 and the gptlab GPT holding the same weights, both in eval mode."""
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours_config = ModelConfig(
        embed_dim=width,
        n_heads=heads,
        num_layers=layers,
        seq_len=POSITIONS,
        tgt_vocab_size=VOCAB,
        dropout=0.0,
        bias=True,
        pos_encoding="learned",
        norm="layernorm",
        activation="gelu",
        tie_embeddings=True,
    )
    ours = GPT.from_hf_gpt2(hf.state_dict(), ours_config).eval()
    return hf.to(device), ours.to(device)


def run_ours(model: GPT, prompt: list[int], n: int) -> list[int]:
    cfg = SampleConfig(greedy=True, max_new_tokens=n)
    return [step[0] for step in generate_token_ids(model, [prompt], cfg, pad_id=0)]


@torch.inference_mode()
def run_ours_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.wte.weight.device)  # (1, T)
    for _ in range(n):
        logits, _ = model(ids[:, -model.config.seq_len :])
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@torch.inference_mode()
def run_hf(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        use_cache=True,
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def linear_floor_tokens_per_s(model: torch.nn.Module, repeats: int = 20) -> float:
    """Tokens/s if a decoding step did nothing but multiply one token's vector by each linear
    layer's weights (and add its bias), as the model computes them: no attention, norms or
    sampling. At batch 1 these products read every weight once per token; they bound this model's
    decoding speed."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.zeros(1, 1, m.in_features, dtype=m.weight.dtype, device=m.weight.device) for m in linears]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for linear, x in zip(linears, inputs):
            linear(x)
        best = min(best, time.perf_counter() - started)
    return 1 / best


@torch.inference_mode()
def matrix_timings(width: int, vocab: int = VOCAB, copies_bytes: float = 60e6) -> None:
    """Time one row's product with each kind of weight matrix of a `width`-wide GPT-2 block, three
    ways: nn.Linear, nn.Linear with the weight stored (in, out), and MatVecLinear. Each is timed
    over enough distinct copies (about 60 MB) that the weights come from memory, as in decoding."""
    shapes = {"q, k, v": (width, 3 * width), "attention out": (width, width), "MLP up": (width, 4 * width),
              "MLP down": (4 * width, width), "output head": (width, vocab)}  # fmt: skip
    print("\n| matrix (in x out) | nn.Linear us | (in, out) layout us | MatVecLinear us |\n|---|---|---|---|")
    for name, (n_in, n_out) in shapes.items():
        linears = [nn.Linear(n_in, n_out) for _ in range(max(4, int(copies_bytes / (4 * n_in * n_out))))]
        transposed = [copy.deepcopy(linear) for linear in linears]
        for linear in transposed:
            linear.weight.data = linear.weight.data.t().contiguous().t()
        fast = [MatVecLinear.from_linear(copy.deepcopy(linear)) for linear in linears]
        x = torch.randn(1, 1, n_in)
        cells = []
        for layers in (linears, transposed, fast):
            best = float("inf")
            for _ in range(30):
                started = time.perf_counter()
                for layer in layers:
                    layer(x)
                best = min(best, (time.perf_counter() - started) / len(layers))
            cells.append(f"{best * 1e6:,.0f}")
        print(f"| {name}: {n_in} x {n_out} | " + " | ".join(cells) + " |", flush=True)


def best_times(repeats: int, runs: dict, device: torch.device) -> dict[str, tuple[float, list[int]]]:
    """For each named run(), the shortest wall time of `repeats` calls and its tokens. The runs
    take turns, so that a burst of other work on the machine slows them alike."""
    best = {name: (float("inf"), []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start, tokens), key=lambda pair: pair[0])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500, help="new tokens per run (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES), help="weight dtypes")
    parser.add_argument("--no_cache_repeats", type=int, default=1, help="runs of the slow no-cache loop (0 skips it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, n, prompt = torch.device(args.device), args.tokens, [1]

    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
        f"{torch.get_num_threads()} thread(s); batch 1, 1-token prompt, {n} new tokens, greedy, "
        f"vocab {VOCAB}, n_positions {POSITIONS}\n"
    )
    print(
        "| model | weights | gptlab tok/s | HF tok/s | gptlab / HF | gptlab / HF fp32 | linear-layer floor tok/s "
        "| gptlab / floor | no-cache tok/s | cache / no-cache | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layers, width, heads in SIZES:
        hf_fp32, ours_fp32 = make_models(layers, width, heads, device)
        hf_fp32_tok_s = None
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            # What `gptlab generate --dtype` does to a loaded model; HF's generate takes the model as it is.
            ours = ready_for_generation(copy.deepcopy(ours_fp32), dtype)
            hf = copy.deepcopy(hf_fp32).to(dtype)
            run_ours(ours, prompt, 20), run_hf(hf, prompt, 20)  # warm up both
            timed = best_times(
                args.repeats,
                {
                    "ours": lambda: run_ours(ours, prompt, n),
                    "hf": lambda: run_hf(hf, prompt, n),
                },
                device,
            )
            (ours_s, ours_tokens), (hf_s, hf_tokens) = timed["ours"], timed["hf"]
            hf_fp32_tok_s = hf_fp32_tok_s or (n / hf_s if dtype_name == "fp32" else None)
            vs_fp32 = f"{n / ours_s / hf_fp32_tok_s:.2f}x" if hf_fp32_tok_s else "-"
            no_cache = "-", "-"
            if args.no_cache_repeats and dtype_name == "fp32":
                slow = {"slow": lambda: run_ours_without_cache(ours, prompt, n)}
                slow_s, slow_tokens = best_times(args.no_cache_repeats, slow, device)["slow"]
                assert slow_tokens == ours_tokens, "the KV cache changed the greedy tokens"
                no_cache = f"{n / slow_s:,.0f}", f"{slow_s / ours_s:.1f}x"
            # Same weights, greedy: the paths agree unless float rounding flips a near-tie.
            same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
            floor = linear_floor_tokens_per_s(ours)
            print(
                f"| {layers} layers x {width} | {dtype_name} | {n / ours_s:,.0f} | {n / hf_s:,.0f} "
                f"| {hf_s / ours_s:.2f}x | {vs_fp32} | {floor:,.0f} | {n / ours_s / floor:.2f} "
                f"| {no_cache[0]} | {no_cache[1]} | {same}/{n} |",
                flush=True,
            )
    if device.type == "cpu":
        matrix_timings(width=SIZES[-1][1])


if __name__ == "__main__":
    main()
