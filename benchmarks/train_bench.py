"""Training throughput: gptlab's GPT vs Hugging Face GPT2LMHeadModel with the same shapes, on CPU.

Both train with identical AdamW settings on the same random token batches; each timing is a few
warm-up steps then `--steps` timed steps, the two models alternated `--rounds` times, best kept.
Each timing runs in a fresh process, set up as its users run it: gptlab as `gptlab train` sets up
CPU training (configure_backend, which keeps freed memory for reuse: gptlab/host_memory.py), Hugging
Face with the defaults. Fresh processes, because the C allocator's state carries over from one
model's run to the next. Two more rows swap that one setting, to show what it is worth on each side.
Also gptlab with bf16 autocast and with torch.compile, each row's MFU against a matmul peak
measured in that row's dtype (float32 or bfloat16), and the fp32 "matmul floor": the tokens/s of a step that did nothing but its linear layers'
matrix multiplies, which no fp32 implementation of this model on PyTorch's kernels can beat.
With --loss_memory, also the peak memory of the output head and loss with GPT-2's vocabulary,
fused (as gptlab trains) or not.
Run:  python benchmarks/train_bench.py [--loss_memory]  (needs `transformers`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from gptlab.config import ModelConfig
from gptlab.device import autocast, configure_backend
from gptlab.models import GPT
from gptlab.training.metrics import measure_matmul_flops


def gptlab_model(args) -> GPT:
    cfg = ModelConfig(
        embed_dim=args.embed_dim,
        num_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq_len,
        tgt_vocab_size=args.vocab,
        dropout=0.0,
        bias=True,
        pos_encoding="learned",
        norm="layernorm",
        activation="gelu",
        tie_embeddings=True,
    )
    return GPT(cfg)


def hf_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.embed_dim,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def steps_per_second(model, loss_of, args, dtype=torch.float32) -> tuple[float, float]:
    """Optimizer steps per second over args.steps steps after args.warmup warm-up steps, and the
    page faults per step (minor: memory the system hands over, not disk) in those steps."""
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]  # what gptlab's build_optimizer does, for both models alike
    optimizer = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=generator)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step():
        with autocast(torch.device("cpu"), dtype):
            loss = loss_of(model, inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    faults_before, started = page_faults(), time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - started
    return args.steps / elapsed, (page_faults() - faults_before) / args.steps


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_floor_tokens_per_s(model: GPT, args, repeats: int = 10) -> float:
    """Tokens/s if a training step did nothing but the matrix multiplies of its linear layers and
    output head (forward x W^T, backward dY W and dY^T x), at this step's shapes, in float32.

    Attention, norms, activations, the loss and the optimizer are left out, so no fp32 step of
    this model can be faster: the ceiling for any implementation, ours or Hugging Face's.
    """
    tokens = args.batch_size * args.seq_len
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]  # (out, in)
    operands = [
        (torch.randn(tokens, n_in), torch.randn(n_out, n_in), torch.randn(tokens, n_out)) for n_out, n_in in shapes
    ]

    def one_step():
        for x, w, grad_y in operands:
            torch.mm(x, w.t())  # forward
            torch.mm(grad_y, w)  # gradient of the input
            torch.mm(grad_y.t(), x)  # gradient of the weight

    one_step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        one_step()
        best = min(best, time.perf_counter() - started)
    return tokens / best


def head_and_loss_peak_mb(fused: bool, tokens: int = 16384, width: int = 384, vocab: int = 50304) -> float:
    """Peak memory (MB of RSS above the start) of the output head and loss, forward and backward,
    for `tokens` positions: gptlab's linear_cross_entropy (fused) or F.linear + F.cross_entropy.
    Linux only: it resets the process's peak RSS (/proc/self/clear_refs) and reads it back (VmHWM)."""
    from gptlab.models.fused_loss import linear_cross_entropy

    def rss_kib(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, width)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak starts again from the current RSS
    start = rss_kib("VmRSS")
    if fused:
        linear_cross_entropy(hidden, weight, targets).backward()
    else:
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight), targets).backward()
    return (rss_kib("VmHWM") - start) / 1024


def in_fresh_process(function, *args):
    """function(*args), called in a new Python process: no allocator state or peak RSS carried over."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def print_loss_memory() -> None:
    """head_and_loss_peak_mb, fused and not, each in a fresh process (peak RSS only grows)."""
    fused, plain = (in_fresh_process(head_and_loss_peak_mb, flag) for flag in (True, False))
    print(
        f"\nhead + loss, forward and backward, 16,384 tokens x 50,304 ids: peak {fused:,.0f} MB "
        f"(linear_cross_entropy) against {plain:,.0f} MB (F.linear + F.cross_entropy)"
    )


def gptlab_loss(model, x, y):
    return model(x, y, return_logits=False)[1]  # as gptlab's training loop calls it


def hf_loss(model, x, y):
    # HF shifts labels itself: pass the window whose first token has no target.
    logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


OURS, REFERENCE = "gptlab fp32 eager", "HF GPT2LMHeadModel fp32 eager"
HF_WITH_SETTING = "HF fp32 eager, with gptlab's CPU memory setting"
OURS_WITHOUT_SETTING = "gptlab fp32 eager, without its CPU memory setting"
# Each row: the model, its autocast dtype, whether it is compiled, and whether the process is set
# up as `gptlab train` sets up CPU training.
ROWS = {
    OURS: ("gptlab", torch.float32, False, True),
    REFERENCE: ("hf", torch.float32, False, False),
    HF_WITH_SETTING: ("hf", torch.float32, False, True),
    OURS_WITHOUT_SETTING: ("gptlab", torch.float32, False, False),
    "gptlab bf16 autocast": ("gptlab", torch.bfloat16, False, True),
    "gptlab fp32 torch.compile": ("gptlab", torch.float32, True, True),
}


def variant(name: str) -> str | None:
    """The --skip choice that leaves ROWS[name] out, if any."""
    _, dtype, compiled, _ = ROWS[name]
    return "bf16" if dtype == torch.bfloat16 else "compile" if compiled else None


def time_row(name: str, args) -> tuple[float, float]:
    """Steps per second and page faults per step of ROWS[name], in this (fresh) process."""
    side, dtype, compiled, as_gptlab_train = ROWS[name]
    if as_gptlab_train:
        configure_backend(torch.device("cpu"))
    torch.manual_seed(0)
    model = (gptlab_model if side == "gptlab" else hf_model)(args).train()
    loss_of = gptlab_loss if side == "gptlab" else hf_loss
    return steps_per_second(torch.compile(model) if compiled else model, loss_of, args, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embed_dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the allocator settles in 3-5)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", nargs="*", default=[], choices=["bf16", "compile"], help="variants to leave out")
    parser.add_argument("--loss_memory", action="store_true", help="also the head and loss's peak memory, fused or not")
    args = parser.parse_args()

    best = {name: 0.0 for name in ROWS if variant(name) not in args.skip}
    faults = {}  # of the best timing's steps
    for _ in range(args.rounds):  # alternate, keep the best: the machine is shared and noisy
        for name in best:
            rate, faults_per_step = in_fresh_process(time_row, name, args)
            if rate > best[name]:
                best[name], faults[name] = rate, faults_per_step

    torch.manual_seed(0)
    ours = gptlab_model(args)
    tokens = args.batch_size * args.seq_len
    # The best of many: the machine may be shared.
    peaks = {dtype: measure_matmul_flops(dtype, repeats=20) for dtype in (torch.float32, torch.bfloat16)}
    flops_per_token = ours.flops_per_token()
    print(
        f"config: {args.layers} layers, embed {args.embed_dim}, {args.heads} heads, seq {args.seq_len}, "
        f"batch {args.batch_size}, vocab {args.vocab}; {torch.get_num_threads()} threads; measured matmul "
        f"peak {peaks[torch.float32] / 1e9:.1f} GFLOP/s fp32, {peaks[torch.bfloat16] / 1e9:.1f} bf16"
    )
    best["fp32 matmul floor (linear layers' matmuls alone)"] = matmul_floor_tokens_per_s(ours, args) / tokens
    reference = best[REFERENCE]
    print("| run | tokens/s | vs HF | MFU (its dtype's matmul peak) | page faults a step |\n|---|---|---|---|---|")
    for name, rate in best.items():
        tokens_per_s = rate * tokens
        dtype = ROWS[name][1] if name in ROWS else torch.float32  # the floor is float32
        mfu = flops_per_token * tokens_per_s / peaks[dtype]
        faults_per_step = f"{faults[name]:,.0f}" if name in faults else "-"
        print(f"| {name} | {tokens_per_s:,.0f} | {rate / reference:.2f}x | {100 * mfu:.1f}% | {faults_per_step} |")
    print(
        f"\nwith the same memory setting on both sides, gptlab / HF = {best[OURS] / best[HF_WITH_SETTING]:.2f}x; "
        f"with the default on both, {best[OURS_WITHOUT_SETTING] / reference:.2f}x"
    )
    if args.loss_memory:
        print_loss_memory()


if __name__ == "__main__":
    main()
