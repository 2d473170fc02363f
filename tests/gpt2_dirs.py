"""Small random GPT-2 directories as `huggingface-cli download gpt2` leaves them: GPT-2's
vocab.json/merges.txt format (bytes in the order of their printable characters, not 0..255;
<|endoftext|> last) and save_pretrained's config.json + model.safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab.tokenizers.bpe import BPETokenizer
from gptlab.tokenizers.byte_level import bytes_to_unicode, token_to_text


def gpt2_ordered_ranks(bpe: BPETokenizer) -> dict[bytes, int]:
    """`bpe`'s tokens numbered as GPT-2 numbers its own: the 256 bytes in the order of their
    printable characters (not 0..255), then one id per merge."""
    byte_order = sorted(range(256), key=lambda b: bytes_to_unicode()[b])
    ranks = {bytes([b]): i for i, b in enumerate(byte_order)}
    ranks |= {bpe.token_bytes(256 + rank): 256 + rank for rank in range(bpe.n_merges)}
    return ranks


def save_random_gpt2(directory: Path, bpe: BPETokenizer, n_embd: int, n_head: int, noise: float):
    """Write `bpe` and a 2-layer GPT2LMHeadModel (weights perturbed by `noise`, so that its
    choices are not all alike) into `directory`; return the model."""
    import transformers

    vocab = {token_to_text(token): i for token, i in gpt2_ordered_ranks(bpe).items()}
    vocab["<|endoftext|>"] = len(vocab)
    merges = [f"{token_to_text(bpe.token_bytes(a))} {token_to_text(bpe.token_bytes(b))}" for a, b in bpe.merges]
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=32,
        vocab_size=len(vocab),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=len(vocab) - 1,
        eos_token_id=len(vocab) - 1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn_like(param))
    model.save_pretrained(directory)
    return model
