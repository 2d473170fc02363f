"""Generation benchmark: gptlab's KV-cache decoding beside Hugging Face's, same weights, one run.

    python benchmarks/generate_bench.py [--tokens 500] [--gpt2_tokens 200] [--threads N] [--repeats 5]
        [--dtypes fp32 int8] [--checkpoint RUN.pth --val_data data/shakespeare/val.txt]

For each model size (4 x 128 and 6 x 384 with vocabulary 8192, and GPT-2-124M's shape: 12 x 768,
vocabulary 50,257), a random Hugging Face `GPT2LMHeadModel` (1024 positions) is loaded into gptlab
with `GPT.from_hf_gpt2`, so both decode with identical weights. Batch 1, a 1-token prompt, greedy,
exactly --tokens new tokens (--gpt2_tokens for GPT-2's shape), with gptlab's weights in each of
--dtypes. Timed:
  - gptlab: `generate_token_ids` (preallocated KV cache, sampling on the device) on the model
    made `ready_for_generation`, as `gptlab generate --dtype D` does (fp32: each matrix shape in
    the layout measured fastest; int8: int8 weights, gptlab.models.int8), with the decoding step
    it picks ("step": native, the step in C of gptlab.models.native_step, or DecodeStep); where that
    is native, also the same weights made ready and decoded as without it ("DecodeStep tok/s":
    layouts measured for PyTorch's products, the eager DecodeStep);
  - HF: `model.generate(use_cache=True, do_sample=False, max_new_tokens=N, min_new_tokens=N)` in
    fp32 (and in bf16 when --dtypes asks for bf16); the int8 rows compare with HF's fp32 run;
  - optionally (--no_cache_repeats) gptlab without cache: a forward pass over the whole text per step;
and gptlab's linear-layer floor: the speed of a step that did nothing but PyTorch's products of
one token's vector by every weight matrix, in the layouts measured fastest for them (as DecodeStep
computes them), which at batch 1 read all the weights every token. The native step computes its
products itself, so it can pass this floor.
"same as HF" counts the greedy tokens equal to HF's in the same dtype. For int8 that column gives
instead the change in validation bits per byte on a trained --checkpoint (fp32 -> int8), when one
is given. After each size, the layout chosen for each matrix shape (for DecodeStep), with every
candidate's time.
Each time is the best of --repeats runs (the machine may be shared; the best run is the least
disturbed). Both sides get the same number of threads: all cores by default, as torch sets it.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from unittest import mock

import torch
import torch.nn.functional as F

from gptlab.config import ModelConfig, SampleConfig
from gptlab.device import weights_dtype
from gptlab.generation import generate_token_ids, ready_for_generation
from gptlab.models import GPT, native_step
from gptlab.models.decode_step import product
from gptlab.models.int8 import Int8Linear
from gptlab.models.layout_choice import choose_layouts
from gptlab.models.matvec import LAYOUTS
from gptlab.models.native_step import decodes_natively

POSITIONS = 1024
GPT2_VOCAB = 50257
SIZES = [(4, 128, 4, 8192), (6, 384, 6, 8192), (12, 768, 12, GPT2_VOCAB)]  # (layers, width, heads, vocab)


def make_models(layers: int, width: int, heads: int, vocab: int, device: torch.device):
    """A random HF GPT-2 and the gptlab GPT holding the same weights, both in eval mode."""
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=vocab,
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
        tgt_vocab_size=vocab,
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


def without_native_step():
    """Generation as on a machine without a C compiler: ready_for_generation measures the layouts
    for PyTorch's products and DecodeStep decodes (models/native_step.py)."""
    return mock.patch.object(native_step, "native_library", lambda: None)


def run_ours_eager(model: GPT, prompt: list[int], n: int) -> list[int]:
    with without_native_step():
        return run_ours(model, prompt, n)


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
    layer's weights (and add its bias), as a decoding step computes them (DecodeStep's `product`):
    no attention, norms or sampling. At batch 1 these products read every weight once per token;
    they bound this model's decoding speed."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    device, dtype = model.wte.weight.device, model.wte.weight.dtype
    products = [product(m) for m in linears]
    inputs = [torch.zeros(1, m.in_features, dtype=dtype, device=device) for m in linears]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for multiply, x in zip(products, inputs):
            multiply(x)
        best = min(best, time.perf_counter() - started)
    return 1 / best


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


@torch.inference_mode()
def bits_per_byte(model: GPT, dataset, batches: int, batch_size: int = 8) -> float:
    """Validation bits per byte over the first `batches` batches of `dataset`, from the logits
    (the path generation uses, so an int8 head is the one measured)."""
    from gptlab.data import iterate_batches

    nats, tokens = 0.0, 0
    for i, (x, y) in enumerate(iterate_batches(dataset, batch_size, shuffle=False, seed=0, epoch=0)):
        if i >= batches:
            break
        logits, _ = model(x)  # (B, T, V)
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        tokens += y.numel()
    return nats / tokens / math.log(2) / dataset.bytes_per_token


@torch.inference_mode()
def stepwise_bits_per_byte(model: GPT, dataset, windows: int) -> float:
    """Bits per byte over the first `windows` windows as decoding computes them: each window's
    first token by a forward pass, every next one by the model's decoding step after the KV cache
    (for one row on a CPU: the C step, with its own products and roundings)."""
    from gptlab.data import iterate_batches

    step, nats, tokens = native_step.decode_step(model), 0.0, 0
    for i, (x, y) in enumerate(iterate_batches(dataset, 1, shuffle=False, seed=0, epoch=0)):
        if i >= windows:
            break
        cache = model.new_kv_cache(1)
        logits = [model(x[:, :1], kv_cache=cache, last_only=True)[0][:, -1]]
        logits += [step(x[:, t], cache) for t in range(1, x.size(1))]
        nats += F.cross_entropy(torch.cat(logits), y[0], reduction="sum").item()
        tokens += y.numel()
    return nats / tokens / math.log(2) / dataset.bytes_per_token


def int8_quality(checkpoint: str, val_data: str, batches: int, windows: int) -> tuple[str, str]:
    """Validation bits per byte of a trained GPT checkpoint in fp32 and with int8 weights: over
    `batches` batches of 8 windows by forward passes, and over the first `windows` windows also
    decoded token by token (where int8's C step rounds inputs after its own float arithmetic)."""
    from gptlab.data import TokenDataset, resolve_data
    from gptlab.training import load_model

    model, tokenizer, _ = load_model(checkpoint, "cpu")
    dataset = TokenDataset(resolve_data(val_data, tokenizer, progress=False), model.config.seq_len)
    fp32, fp32_few = bits_per_byte(model, dataset, batches), bits_per_byte(model, dataset, windows, batch_size=1)
    int8_model = ready_for_generation(model, torch.qint8)
    int8, int8_few = bits_per_byte(int8_model, dataset, batches), bits_per_byte(int8_model, dataset, windows, 1)
    decoded = stepwise_bits_per_byte(int8_model, dataset, windows)
    step = "C step" if decodes_natively(int8_model) else "DecodeStep"
    change = f"bpb {fp32:.4f} -> {int8:.4f} ({(int8 / fp32 - 1) * 100:+.2f}%)"
    few = f"fp32 {fp32_few:.4f}, int8 forward {int8_few:.4f}, int8 decoded by the {step} {decoded:.4f}"
    return change, f"{change}; first {windows} windows: {few}"


def layout_table(model: GPT) -> str:
    """The layout chosen for each matrix shape of a model made ready in fp32, with every candidate's time."""
    names = {}
    for name, module in model.named_modules():
        if hasattr(module, "layout"):
            names.setdefault((module.in_features, module.out_features), ".".join(name.split(".")[-2:]))
    lines = ["| matrix (in x out) | count | " + " | ".join(f"{c} us" for c in LAYOUTS) + " | chosen |"]
    lines.append("|---|---" + "|---" * len(LAYOUTS) + "|---|")
    for choice in choose_layouts(model):  # the cached choices: nothing is measured again
        cells = [f"{choice.seconds[c] * 1e6:,.0f}" if c in choice.seconds else "-" for c in LAYOUTS]
        name = names[(choice.n_in, choice.n_out)]
        lines.append(
            f"| {name}: {choice.n_in} x {choice.n_out} | {choice.count} | {' | '.join(cells)} | {choice.layout} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500, help="new tokens per run (default: %(default)s)")
    parser.add_argument("--gpt2_tokens", type=int, default=200, help="new tokens per run at GPT-2's shape")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads (default: %(default)s)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best counts")
    parser.add_argument("--gpt2_repeats", type=int, default=3, help="runs per measurement at GPT-2's shape")
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[0, 1, 2], help="which sizes (0: 4x128, 1: 6x384, 2: GPT-2)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "int8"], choices=["fp32", "bf16", "int8"])
    parser.add_argument("--no_cache_repeats", type=int, default=0, help="runs of the slow no-cache loop (fp32)")
    parser.add_argument("--checkpoint", help="a trained GPT .pth: int8's change in validation bits per byte")
    parser.add_argument("--val_data", default="data/shakespeare/val.txt", help="validation text for --checkpoint")
    parser.add_argument("--val_batches", type=int, default=40, help="batches of 8 windows for the bits per byte")
    parser.add_argument("--val_windows", type=int, default=16, help="windows also decoded token by token in int8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import transformers

    quality = "-"
    if args.checkpoint and "int8" in args.dtypes:
        quality, details = int8_quality(args.checkpoint, args.val_data, args.val_batches, args.val_windows)
        print(f"int8 quality on {args.checkpoint}, {args.val_data}: {details}\n")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
        f"{torch.get_num_threads()} thread(s); batch 1, 1-token prompt, greedy, n_positions {POSITIONS}\n"
    )
    header = "| model | weights | gptlab tok/s | HF tok/s | gptlab / HF | gptlab / HF fp32 | linear-layer floor tok/s "
    header += "| gptlab / floor | step | DecodeStep tok/s | no-cache tok/s | same as HF (int8: bpb change) |"
    print(header + "\n" + "|---" * 12 + "|")
    layout_tables = []
    for size in args.sizes:
        layers, width, heads, vocab = SIZES[size]
        gpt2 = vocab == GPT2_VOCAB
        n, repeats, prompt = (args.gpt2_tokens, args.gpt2_repeats, [1]) if gpt2 else (args.tokens, args.repeats, [1])
        hf_fp32, ours_fp32 = make_models(layers, width, heads, vocab, device)
        label = f"{layers} x {width}, vocab {vocab:,}" + (" (GPT-2-124M)" if gpt2 else "")
        hf_fp32_tok_s = None
        ready_fp32 = None
        for dtype_name in args.dtypes:
            # What `gptlab generate --dtype` does to a loaded model; HF's generate takes the model as it is.
            ours = ready_for_generation(copy.deepcopy(ours_fp32), weights_dtype(dtype_name, device))
            runs = {"ours": lambda ours=ours: run_ours(ours, prompt, n)}
            native = decodes_natively(ours)
            eager_model = ours
            if native:  # the same weights, made ready and decoded as without the native step: what it gains
                with without_native_step():
                    eager_model = ready_for_generation(copy.deepcopy(ours_fp32), weights_dtype(dtype_name, device))
                runs["eager"] = lambda eager_model=eager_model: run_ours_eager(eager_model, prompt, n)
            hf = None
            if dtype_name != "int8":  # HF has no int8 path of its own here: int8 rows compare with HF fp32
                hf = copy.deepcopy(hf_fp32).to(weights_dtype(dtype_name, device))
                runs["hf"] = lambda hf=hf: run_hf(hf, prompt, n)
            run_ours(ours, prompt, 20), hf is not None and run_hf(hf, prompt, 20)  # warm up
            timed = best_times(repeats, runs, device)
            ours_s, ours_tokens = timed["ours"]
            if dtype_name == "fp32":
                hf_fp32_tok_s, ready_fp32 = n / timed["hf"][0], eager_model
            hf_tok_s = n / timed["hf"][0] if hf is not None else hf_fp32_tok_s
            vs_fp32 = f"{n / ours_s / hf_fp32_tok_s:.2f}x" if hf_fp32_tok_s else "-"
            no_cache = "-"
            if args.no_cache_repeats and dtype_name == "fp32":
                slow = {"slow": lambda: run_ours_without_cache(ours, prompt, n)}
                slow_s, slow_tokens = best_times(args.no_cache_repeats, slow, device)["slow"]
                assert slow_tokens == ours_tokens, "the KV cache changed the greedy tokens"
                no_cache = f"{n / slow_s:,.0f}"
            # Same weights, greedy: the paths agree unless float rounding flips a near-tie.
            same = quality if hf is None else f"{sum(a == b for a, b in zip(ours_tokens, timed['hf'][1]))}/{n}"
            floor = linear_floor_tokens_per_s(eager_model)  # PyTorch's products in the layouts measured fastest
            eager = f"{n / timed['eager'][0]:,.0f}" if native else "-"
            hf_cell = f"{hf_tok_s:,.0f}" if hf_tok_s else "-"
            ratio = f"{hf_tok_s and n / ours_s / hf_tok_s:.2f}x" if hf_tok_s else "-"
            print(
                f"| {label} | {dtype_name} | {n / ours_s:,.0f} | {hf_cell}{' (fp32)' if hf is None else ''} "
                f"| {ratio} | {vs_fp32} | {floor:,.0f} | {n / ours_s / floor:.2f} | {'native' if native else 'DecodeStep'} "
                f"| {eager} | {no_cache} | {same} |",
                flush=True,
            )
        if ready_fp32 is not None and device.type == "cpu":
            layout_tables.append((label, layout_table(ready_fp32)))
    for label, table in layout_tables:
        print(f"\nLayouts chosen for {label} (fp32, one row's product, best time per matrix):\n{table}")


if __name__ == "__main__":
    main()
