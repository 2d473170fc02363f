"""Full fine-tuning against LoRA on a GPT-2-124M-shaped model, on the CPU.

    python benchmarks/lora_bench.py [--rank 8] [--steps 3] [--warmup 1] [--batch_size 8] [--seq_len 256]

A GPT of GPT-2 small's shape (12 layers x 768, 12 heads, vocabulary 50,257, learned positions,
biases, tied head; random weights) takes AdamW steps on random token ids, once training every
weight and once training only LoRA adapters (rank --rank, gptlab's defaults: alpha 2 * rank, every
linear layer of the blocks). Each variant runs in a fresh subprocess, so that its peak resident
memory (the RSS high-water mark, which includes the model, gradients, optimizer state and
activations) is its own. Reported: the median step time after --warmup steps, the peak RSS, the
trainable parameters, and the size on disk of the checkpoint gptlab writes for the run (full: the
model and its AdamW moments; LoRA: the adapters, their moments and a pointer to the base).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.models import GPT
from gptlab.tokenizers.char import CharTokenizer
from gptlab.training.checkpoint import save_checkpoint
from gptlab.training.lora import LoRARun
from gptlab.training.optim import build_optimizer

GPT2_SMALL = dict(
    embed_dim=768, n_heads=12, num_layers=12, tgt_vocab_size=50257, pos_encoding="learned", bias=True,
    norm="layernorm", activation="gelu", tie_embeddings=True, dropout=0.0,
)  # fmt: skip


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Train `variant` (full or lora) for warmup + steps steps in this process; its measurements."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(seq_len=args.seq_len, **GPT2_SMALL)
    model = GPT(model_cfg)
    lora_settings = {"lora_rank": args.rank} if variant == "lora" else {}
    train_cfg = TrainConfig(learning_rate=1e-4, **lora_settings)
    lora = LoRARun(model, train_cfg, model.state_dict(), "gpt2-124m-random") if variant == "lora" else None
    model.train()
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        idx = torch.randint(0, model_cfg.tgt_vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
        started = time.perf_counter()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as directory:
        extra: dict = {}
        state = model.state_dict()
        if lora is not None:
            state = lora.checkpoint_state(state, extra)
        path = save_checkpoint(
            Path(directory) / "run.pth", model, CharTokenizer("ab"), model_cfg, DatasetConfig(), train_cfg,
            step=1, epoch=1, extra=extra, model_state=state, optimizer_state=optimizer.state_dict(),
        )  # fmt: skip
        size = path.stat().st_size
    return {
        "variant": variant,
        "step_s": statistics.median(times[args.warmup :]),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--variant", choices=["full", "lora"], help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    passed = [f"--{k}={getattr(args, k)}" for k in ("rank", "steps", "warmup", "batch_size", "seq_len")]
    results = []
    for variant in ("full", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--variant", variant], check=True, capture_output=True, text=True
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    full, lora = results
    print(f"GPT-2-124M shape, batch {args.batch_size} x seq {args.seq_len}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps after {args.warmup}; torch {torch.__version__}\n")  # fmt: skip
    print("| | step time (s) | peak RSS (MiB) | trainable parameters | checkpoint (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for result, name in ((full, "full fine-tuning"), (lora, f"LoRA rank {args.rank}")):
        print(
            f"| {name} | {result['step_s']:.2f} | {result['peak_rss_bytes'] / 2**20:,.0f} | "
            f"{result['trainable']:,} ({100 * result['trainable'] / result['total']:.2f}%) | "
            f"{result['checkpoint_bytes'] / 2**20:,.1f} |"
        )
    print(
        f"| LoRA / full | {lora['step_s'] / full['step_s']:.2f}x | "
        f"{lora['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}x | "
        f"{lora['trainable'] / full['trainable']:.4f}x | {lora['checkpoint_bytes'] / full['checkpoint_bytes']:.4f}x |"
    )


if __name__ == "__main__":
    main()
