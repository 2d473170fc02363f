"""Exporting a GPT as one GGUF file, the format llama.cpp (and Ollama, LM Studio, ...) runs.

The same two configurations as the Hugging Face export have a llama.cpp architecture with
the same arithmetic:

    learned positions + layernorm + gelu (tanh)  ->  gpt2
    rope + rmsnorm + swiglu                      ->  llama

The file is written with `gguf`, the writer llama.cpp maintains, and carries the tokenizer:
the byte-level BPE's tokens (in GPT-2's printable form) and merges, the special tokens (as
control tokens: read as special only when asked, as our `allowed_special`) and the name under
which llama.cpp knows our split regex (its "pre-tokenizer").
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.files import atomic_path
from gptlab.interop.hf_tokenizer import ByteLevelBPE, as_byte_level_bpe
from gptlab.models import GPT
from gptlab.models.blocks import swiglu_hidden_dim
from gptlab.models.gpt import EXTRAS_OFF
from gptlab.tokenizers.base import BOS, EOS, PAD, UNK, Tokenizer
from gptlab.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN
from gptlab.tokenizers.byte_level import token_to_text
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_MAGIC = b"GGUF"
# Our split regexes under llama.cpp's names (llama-vocab.cpp): "gpt-2" runs GPT-2's regex,
# "llama-bpe" Llama 3's, which is GPT-4's cl100k regex (tiktoken's newer spelling of it is ours).
# "llama-bpe" also takes a chunk that is a whole token as that token, as tiktoken does.
PRE_TOKENIZERS = {
    GPT2_PATTERN: "gpt-2",
    KNOWN_ENCODINGS["gpt2"][0]: "gpt-2",  # tiktoken's r50k spelling of GPT-2's regex
    GPT4_PATTERN: "llama-bpe",
}
# The fields that decide the architecture, and the values each llama.cpp architecture needs.
NEEDS = {
    "gpt2": {"pos_encoding": "learned", "norm": "layernorm", "activation": "gelu", **EXTRAS_OFF},
    "llama": {"pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", **EXTRAS_OFF},
}
Q8_BLOCK = 32  # values per q8_0 block: a row must be a multiple of it


def require_gguf() -> ModuleType:
    """The `gguf` package, or GptlabError telling how to install it."""
    try:
        return importlib.import_module("gguf")
    except ImportError:
        raise GptlabError("the gguf package is not installed; run pip install gguf") from None


def check_gguf_out(out: str | Path, force: bool) -> Path:
    """`out` as a Path, or GptlabError when it may not be written: a directory, a missing folder,
    an existing file without `force`, or (even with `force`) an existing file that is not GGUF.
    Call it before any slow work, so that a refusal costs nothing."""
    out = Path(out)
    if out.is_dir():
        raise GptlabError(f"{out} is a directory; --format gguf writes one file, so name a file such as model.gguf")
    if not out.parent.is_dir():
        raise GptlabError(f"the folder {out.parent} of --out does not exist; create it first")
    if out.exists():
        if not force:
            raise GptlabError(f"{out} already exists; choose another --out or pass --force to replace it")
        with open(out, "rb") as existing:
            if existing.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise GptlabError(f"{out} is not a GGUF file, so --force will not replace it; choose another --out")
    return out


def gguf_architecture(model: GPT) -> str:
    """llama.cpp's name for the architecture that computes what `model` computes; GptlabError
    naming the field that has none."""
    if getattr(model.config, "model", "gpt") != "gpt":
        raise GptlabError("only a GPT (decoder-only) can be exported as GGUF; this model is an encoder-decoder")
    config = model.config
    family = next((name for name, needs in NEEDS.items() if needs["pos_encoding"] == config.pos_encoding), None)
    if family is None:
        raise GptlabError(
            f"pos_encoding={config.pos_encoding!r} has no llama.cpp (GGUF) equivalent (gpt2 needs 'learned', llama "
            "'rope'); export with --format safetensors to keep it for gptlab"
        )
    for field, needed in NEEDS[family].items():
        if getattr(config, field) != needed:
            raise GptlabError(
                f"{field}={getattr(config, field)!r} has no llama.cpp (GGUF) equivalent with pos_encoding="
                f"{config.pos_encoding!r} ({family} needs {field}={needed!r}); export with --format safetensors "
                "to keep it for gptlab"
            )
    return family


def gguf_tokenizer(tokenizer: Tokenizer) -> tuple[ByteLevelBPE, str]:
    """Our byte-level BPE and llama.cpp's name for its split regex; GptlabError for the
    tokenizers llama.cpp would encode differently."""
    if tokenizer.kind not in ("default", "tiktoken"):
        raise GptlabError(
            f"a {tokenizer.kind} tokenizer cannot go into a GGUF file: llama.cpp reads byte-level BPE here, which only "
            "gptlab's default BPE and tiktoken tokenizers are; export with --format safetensors instead"
        )
    bpe = as_byte_level_bpe(tokenizer)
    pre = PRE_TOKENIZERS.get(bpe.pattern)
    if pre is None:
        raise GptlabError(
            f"llama.cpp knows no pre-tokenizer for this tokenizer's split regex {bpe.pattern[:60]!r}...; only the GPT-2 "
            "and GPT-4 patterns (--pattern gpt2 / gpt4) export to GGUF"
        )
    return bpe, pre


def export_gguf(model: GPT, tokenizer: Tokenizer, out: str | Path, outtype: str = "f32", force: bool = False) -> str:
    """Write `model` and `tokenizer` as the GGUF file `out` (weights as `outtype`: f32, f16 or
    q8_0). Returns llama.cpp's architecture name.

    Everything is checked before anything is written; the file is written beside `out` and
    renamed onto it only once complete, and with `force` only a GGUF file is replaced.
    """
    out = check_gguf_out(out, force)
    gguf = require_gguf()
    if outtype not in OUTTYPES:
        raise GptlabError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    architecture = gguf_architecture(model)
    bpe, pre = gguf_tokenizer(tokenizer)
    rows = model.config.tgt_vocab_size
    if tokenizer.vocab_size > rows:
        raise GptlabError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {rows} rows; they do not belong together"
        )
    tensors = gpt2_tensors(model) if architecture == "gpt2" else llama_tensors(model)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        _add_hparams(writer, gguf, model, architecture, outtype)
        _add_tokenizer(writer, gguf, bpe, pre, rows)
        for name, tensor in tensors.items():
            data, dtype = _encode(gguf, tensor, outtype)
            writer.add_tensor(name, data, raw_dtype=dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return architecture


def _add_hparams(writer, gguf: ModuleType, model: GPT, architecture: str, outtype: str) -> None:
    config = model.config
    writer.add_name("gptlab")
    writer.add_context_length(config.seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_heads)
    writer.add_vocab_size(config.tgt_vocab_size)
    if architecture == "gpt2":
        writer.add_feed_forward_length(config.expansion_factor * config.embed_dim)
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_feed_forward_length(swiglu_hidden_dim(config))
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[outtype]))


def _add_tokenizer(writer, gguf: ModuleType, bpe: ByteLevelBPE, pre: str, rows: int) -> None:
    """The token list has one entry per embedding row: ordinary tokens, special tokens
    (control), and unused entries for ids no token has (a rounded-up table, gaps)."""
    tokens = [f"<unused {i}>" for i in range(rows)]  # a space: never the printable form of a token
    types = [gguf.TokenType.UNUSED] * rows
    for token, i in bpe.token_ids.items():
        tokens[i], types[i] = token_to_text(token), gguf.TokenType.NORMAL
    for text, i in bpe.special_tokens.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL
    if len(set(tokens)) != rows:
        raise GptlabError(
            "two token ids have the same text, which llama.cpp cannot tell apart; this tokenizer cannot go into GGUF"
        )
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{token_to_text(left)} {token_to_text(right)}" for left, right in bpe.merges])
    roles = {
        BOS: writer.add_bos_token_id,
        EOS: writer.add_eos_token_id,
        UNK: writer.add_unk_token_id,
        PAD: writer.add_pad_token_id,
    }
    for name, add in roles.items():
        if name in bpe.special_tokens:
            add(bpe.special_tokens[name])
    # We never add <BOS>/<EOS> around a prompt; llama.cpp must not either, or ids would differ.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _encode(gguf: ModuleType, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """A tensor as written: norms and biases (1-D) stay f32 as llama.cpp's converter keeps them;
    a q8_0 matrix whose rows are not whole blocks falls back to f16, as there too."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    kind = "f32" if data.ndim == 1 else outtype
    if kind == "q8_0" and data.shape[-1] % Q8_BLOCK:
        kind = "f16"
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]  # fmt: skip
    return gguf.quants.quantize(data, qtype), qtype


# ---- tensors under llama.cpp's names ------------------------------------------------------------
# A GGUF matrix is stored as PyTorch's nn.Linear keeps it, (out, in), so no transposes.
def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's gpt2 names. llama.cpp's gpt2 requires every bias; a
    model without biases gets zero biases, which add nothing."""
    ours = model.state_dict()
    theirs = {"token_embd.weight": ours["wte.weight"], "position_embd.weight": ours["wpe.weight"]}
    layers = [("norm_1", "attn_norm"), ("attn.qkv", "attn_qkv"), ("attn.proj", "attn_output"),
              ("norm_2", "ffn_norm"), ("mlp.fc", "ffn_up"), ("mlp.proj", "ffn_down")]  # fmt: skip
    names = [(f"blocks.{i}.{our}", f"blk.{i}.{gg}") for i in range(model.config.num_layers) for our, gg in layers]
    names.append(("norm_f", "output_norm"))
    for our, gg in names:
        weight = ours[f"{our}.weight"]
        theirs[f"{gg}.weight"] = weight
        theirs[f"{gg}.bias"] = ours.get(f"{our}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    if not model.config.tie_embeddings:
        theirs["output.weight"] = ours["lm_head.weight"]
    return theirs


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's llama names: qkv and gate/value cut apart as for
    transformers, and q and k rows permuted, since llama.cpp's llama rotates adjacent pairs
    (2j, 2j+1) where we rotate (j, j + head_dim/2), as its own converter does for HF weights."""
    ours, config = model.state_dict(), model.config
    C, H = config.embed_dim, config.n_heads
    theirs = {"token_embd.weight": ours["wte.weight"], "output_norm.weight": ours["norm_f.weight"]}
    for i in range(config.num_layers):
        block, layer = f"blocks.{i}", f"blk.{i}"
        theirs[f"{layer}.attn_norm.weight"] = ours[f"{block}.norm_1.weight"]
        theirs[f"{layer}.ffn_norm.weight"] = ours[f"{block}.norm_2.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = ours[f"{block}.attn.qkv.{kind}"].split(C, dim=0)  # (C, ...) each
            gate, up = ours[f"{block}.mlp.fc.{kind}"].chunk(2, dim=0)  # (hidden, ...) each
            theirs |= {
                f"{layer}.attn_q.{kind}": _interleave_halves(q, H),
                f"{layer}.attn_k.{kind}": _interleave_halves(k, H),
                f"{layer}.attn_v.{kind}": v,
                f"{layer}.attn_output.{kind}": ours[f"{block}.attn.proj.{kind}"],
                f"{layer}.ffn_gate.{kind}": gate,
                f"{layer}.ffn_up.{kind}": up,
                f"{layer}.ffn_down.{kind}": ours[f"{block}.mlp.proj.{kind}"],
            }
    if not config.tie_embeddings:
        theirs["output.weight"] = ours["lm_head.weight"]
    return theirs


def _interleave_halves(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, reorder rows (0..hs/2-1 | hs/2..hs-1) as (0, hs/2, 1, hs/2+1, ...): the first
    dim of (C, ...) or (C,), shape unchanged."""
    head_dim = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
