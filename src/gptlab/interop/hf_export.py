"""Exporting a GPT as a Hugging Face transformers model directory.

Two of our configurations have a transformers class with the same arithmetic:

    learned positions + layernorm + gelu (tanh)  ->  GPT2LMHeadModel
    rope + rmsnorm + swiglu                      ->  LlamaForCausalLM

The directory gets config.json, model.safetensors (written here, so exporting needs no
transformers) and the tokenizer's Hugging Face files. Loading it needs no remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.deps import require
from gptlab.interop.hf_tokenizer import hf_tokenizer_files
from gptlab.interop.staging import check_output_dir, staged_directory
from gptlab.models import GPT
from gptlab.models.blocks import swiglu_hidden_dim
from gptlab.models.gpt import EXTRAS_OFF
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import end_of_turn_id, has_chat_template

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
# The fields that decide the architecture, and the values each one needs.
_NEEDS = {
    GPT2: {"pos_encoding": "learned", "norm": "layernorm", "activation": "gelu", **EXTRAS_OFF},
    LLAMA: {"pos_encoding": "rope", "norm": "rmsnorm", "activation": "swiglu", **EXTRAS_OFF},
}


def hf_architecture(config: ModelConfig) -> str:
    """The transformers class that computes what a GPT of `config` computes; GptlabError naming
    the field that has no transformers equivalent otherwise."""
    family = {"learned": GPT2, "rope": LLAMA}.get(config.pos_encoding)
    if family is None:
        raise GptlabError(
            f"pos_encoding={config.pos_encoding!r} has no transformers equivalent (GPT-2 needs 'learned', "
            "Llama 'rope'); export with --format safetensors instead"
        )
    for field, needed in _NEEDS[family].items():
        if getattr(config, field) != needed:
            raise GptlabError(
                f"{field}={getattr(config, field)!r} has no transformers equivalent with pos_encoding="
                f"{config.pos_encoding!r} ({family} needs {field}={needed!r}); export with --format safetensors instead"
            )
    return family


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | Path, force: bool = False) -> str:
    """Write `model` and `tokenizer` as a transformers directory `out` that
    AutoModelForCausalLM / AutoTokenizer load offline. Returns the architecture's class name.

    Everything is checked and converted before anything is written; `out` is replaced only
    with `force` and only when the whole directory is ready.
    """
    check_output_dir(out, force)
    safetensors_torch = require("safetensors.torch")
    architecture = hf_architecture(model.config)
    tokenizer_files = hf_tokenizer_files(tokenizer, model.config.seq_len)
    if architecture == GPT2:
        config, weights = gpt2_config(model.config), gpt2_weights(model)
    else:
        config, weights = llama_config(model.config), llama_weights(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    config |= {
        "architectures": [architecture],
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "tie_word_embeddings": model.config.tie_embeddings,
        "torch_dtype": dtype,  # transformers 4 reads this name,
        "dtype": dtype,  # transformers 5 this one
        "use_cache": True,
    }
    # Copies: safetensors refuses tensors that share memory, as the q/k/v slices of qkv do.
    weights = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in weights.items()}
    with staged_directory(out, force) as staging:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        safetensors_torch.save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        for name, data in tokenizer_files.items():
            (staging / name).write_bytes(data)
        if has_chat_template(tokenizer):  # so that generate() ends an assistant turn at <|end|>
            generation = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}
            generation["eos_token_id"] = [tokenizer.eos_id, end_of_turn_id(tokenizer)]
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return architecture


# ---- GPT-2 ------------------------------------------------------------------------------------
def gpt2_config(config: ModelConfig) -> dict:
    """config.json fields of the GPT2LMHeadModel equal to a GPT of `config`."""
    return {
        "model_type": "gpt2",
        "vocab_size": config.tgt_vocab_size,
        "n_positions": config.seq_len,
        "n_ctx": config.seq_len,
        "n_embd": config.embed_dim,
        "n_layer": config.num_layers,
        "n_head": config.n_heads,
        "n_inner": config.expansion_factor * config.embed_dim,
        "activation_function": "gelu_new",  # the tanh approximation, as ours
        "layer_norm_epsilon": config.norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def gpt2_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under GPT2LMHeadModel's names. GPT-2's Conv1D stores a linear layer's
    weight transposed, (in, out); a model without biases gets zero biases, which add nothing."""
    ours = model.state_dict()
    theirs = {"transformer.wte.weight": ours["wte.weight"], "transformer.wpe.weight": ours["wpe.weight"]}
    layers = [("norm_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
              ("norm_2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]  # fmt: skip
    names = [
        (f"blocks.{i}.{our}", f"transformer.h.{i}.{hf}", conv1d)
        for i in range(model.config.num_layers)
        for our, hf, conv1d in layers
    ]
    names.append(("norm_f", "transformer.ln_f", False))
    for our, hf, conv1d in names:
        weight = ours[f"{our}.weight"]
        theirs[f"{hf}.weight"] = weight.t() if conv1d else weight
        theirs[f"{hf}.bias"] = ours.get(f"{our}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    if not model.config.tie_embeddings:
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    return theirs


# ---- Llama ------------------------------------------------------------------------------------
def llama_config(config: ModelConfig) -> dict:
    """config.json fields of the LlamaForCausalLM equal to a GPT of `config`. Our RoPE already
    pairs dimension i with i + head_dim/2 ("rotate half"), as HF's Llama does, so q and k rows
    need no permutation."""
    return {
        "model_type": "llama",
        "vocab_size": config.tgt_vocab_size,
        "hidden_size": config.embed_dim,
        "intermediate_size": swiglu_hidden_dim(config),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # transformers 5
        "hidden_act": "silu",
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.attention_dropout_p,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
    }


def llama_weights(model: GPT) -> dict[str, torch.Tensor]:
    """Our state dict under LlamaForCausalLM's names: the fused qkv and gate/value matrices
    are cut into q/k/v and gate/up projections (our swiglu computes silu(first half) * second half)."""
    ours, C = model.state_dict(), model.config.embed_dim
    theirs = {"model.embed_tokens.weight": ours["wte.weight"], "model.norm.weight": ours["norm_f.weight"]}
    for i in range(model.config.num_layers):
        block, layer = f"blocks.{i}", f"model.layers.{i}"
        theirs[f"{layer}.input_layernorm.weight"] = ours[f"{block}.norm_1.weight"]
        theirs[f"{layer}.post_attention_layernorm.weight"] = ours[f"{block}.norm_2.weight"]
        for kind in ("weight", "bias") if model.config.bias else ("weight",):
            q, k, v = ours[f"{block}.attn.qkv.{kind}"].split(C, dim=0)  # (C, ...) each
            gate, up = ours[f"{block}.mlp.fc.{kind}"].chunk(2, dim=0)  # (hidden, ...) each
            theirs |= {
                f"{layer}.self_attn.q_proj.{kind}": q,
                f"{layer}.self_attn.k_proj.{kind}": k,
                f"{layer}.self_attn.v_proj.{kind}": v,
                f"{layer}.self_attn.o_proj.{kind}": ours[f"{block}.attn.proj.{kind}"],
                f"{layer}.mlp.gate_proj.{kind}": gate,
                f"{layer}.mlp.up_proj.{kind}": up,
                f"{layer}.mlp.down_proj.{kind}": ours[f"{block}.mlp.proj.{kind}"],
            }
    if not model.config.tie_embeddings:
        theirs["lm_head.weight"] = ours["lm_head.weight"]
    return theirs
