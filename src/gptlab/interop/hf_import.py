"""Starting from a pretrained Hugging Face GPT-2: its weights into our GPT, its tokenizer kept.

The directory is what `huggingface-cli download gpt2 --local-dir gpt2` writes: config.json,
model.safetensors (or pytorch_model.bin, read with weights_only=True: never unpickling code)
and vocab.json + merges.txt. No code from the directory is ever run.

Token ids stay exactly GPT-2's. GPT-2 numbers its 256 byte tokens in its own order, not
0..255 as our default BPE does, so the tokenizer becomes a `tiktoken`-kind tokenizer, which
takes any id assignment: GPT-2's ids 0..50255 for ordinary tokens, 50256 for <|endoftext|>
(usable via allowed_special), and our <PAD> <UNK> <BOS> <EOS> on the next four ids. The
embedding grows by those four rows (or lends them from the spare rows of a table rounded up):
<EOS> starts as a copy of <|endoftext|> (GPT-2's document separator, so a fine-tune or a sample
starts from what GPT-2 learned for it) and <PAD> <UNK> <BOS> as the mean embedding (an
unremarkable token until trained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.deps import require
from gptlab.models import GPT
from gptlab.tokenizers.base import EOS, SPECIAL_TOKENS, Tokenizer
from gptlab.tokenizers.byte_level import read_merges_txt, text_to_token
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS, TiktokenTokenizer

GPT2_SEPARATOR = "<|endoftext|>"
# GPT-2's activation names that are the tanh approximation, which is what our "gelu" computes.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def init_model_from_hf(directory: str | Path) -> tuple[GPT, Tokenizer, ModelConfig]:
    """Our GPT holding a local Hugging Face GPT-2's weights, its tokenizer (GPT-2's ids), and
    the model config. Logits over GPT-2's ids equal transformers'; GptlabError for a directory
    that is not a complete, consistent GPT-2."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    model_cfg = gpt2_model_config(hf_config, directory)
    tokenizer = read_gpt2_tokenizer(directory)  # before the weights: a missing file fails fast
    if tokenizer.vocab_size - len(SPECIAL_TOKENS) > model_cfg.tgt_vocab_size:
        raise GptlabError(
            f"{directory}: the tokenizer has ids up to {tokenizer.vocab_size - len(SPECIAL_TOKENS) - 1} but the model "
            f"only {model_cfg.tgt_vocab_size} embedding rows; the tokenizer files belong to another model"
        )
    state = read_hf_weights(directory)
    check_shapes(state, model_cfg, directory)
    try:
        model = GPT.from_hf_gpt2(state, model_cfg)
    except GptlabError as error:
        raise GptlabError(f"{directory}: config.json and the weights disagree ({error})") from None
    model = with_special_rows(model, tokenizer)
    return model, tokenizer, model.config


# Model fields a fine-tuning run may change; every other shape comes from the pretrained model.
FINE_TUNABLE = {"dropout", "attention_dropout", "seq_len"}


def fine_tuning_start(
    directory: str | Path, model_values: dict[str, Any]
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor]]:
    """The model config, tokenizer and initial weights to fine-tune the GPT-2 in `directory`.

    `model_values` are the model fields the user set: `dropout`, and a `seq_len` up to GPT-2's
    context (its position table is cut to the first seq_len rows); any other field must agree
    with the pretrained model, else GptlabError naming it.
    """
    model, tokenizer, config = init_model_from_hf(directory)
    config, state = fine_tuned(config, model.state_dict(), model_values, f"the pretrained model in {directory}")
    return config, tokenizer, state


def fine_tuned(
    config: ModelConfig, state: dict[str, torch.Tensor], model_values: dict[str, Any], source: str
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`config` and `state` of a starting model (`source`, named in errors) made ready to
    fine-tune: the FINE_TUNABLE fields the user set applied, a learned position table cut to
    seq_len; any other field in `model_values` that differs is a GptlabError naming it."""
    for name, value in model_values.items():
        if name not in FINE_TUNABLE and getattr(config, name) != value:
            raise GptlabError(
                f"--{name} {value} contradicts {source} ({name} = {getattr(config, name)}); drop the flag "
                f"(only {', '.join(sorted(FINE_TUNABLE))} may change)"
            )
    seq_len = int(model_values.get("seq_len", config.seq_len))
    if seq_len > config.seq_len:
        raise GptlabError(f"--seq_len {seq_len} exceeds the context of {source} ({config.seq_len}); lower it")
    if "wpe.weight" in state:  # learned positions beyond seq_len are never used
        state = {**state, "wpe.weight": state["wpe.weight"][:seq_len]}
    updates = {name: model_values[name] for name in FINE_TUNABLE if name in model_values}
    return config.model_copy(update=updates), state


# ---- config.json ------------------------------------------------------------------------------
def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json of a Hugging Face GPT-2 directory; GptlabError naming another architecture."""
    download = f"huggingface-cli download gpt2 --local-dir {directory}"
    if not directory.is_dir():
        raise GptlabError(f"Hugging Face model directory {directory} not found; download it with {download}")
    path = directory / "config.json"
    if not path.is_file():
        raise GptlabError(
            f"{directory} has no config.json, so it is not a Hugging Face model directory; try {download}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{path} is not valid JSON ({error}); download the model again") from None
    if not isinstance(config, dict):
        raise GptlabError(f"{path} is not a JSON object; download the model again")
    if config.get("format") == "gptlab-safetensors":
        raise GptlabError(
            f"{directory} is a gptlab safetensors directory, not a Hugging Face one; pass it as --model_path"
        )
    if config.get("model_type") != "gpt2":
        found = config.get("model_type") or "unknown"
        architectures = ", ".join(config.get("architectures") or []) or "none named"
        raise GptlabError(
            f"{directory} holds a {found!r} model (config.json architectures: {architectures}), "
            "but only GPT-2 models can be imported"
        )
    return config


def gpt2_model_config(config: dict[str, Any], directory: Path) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json; GptlabError naming a setting we do not compute."""
    activation = config.get("activation_function", "gelu_new")
    unsupported = [
        ("activation_function", activation not in TANH_GELU, f"{activation!r} (only the tanh GELU, gelu_new)"),
        ("scale_attn_weights", config.get("scale_attn_weights", True) is not True, "false"),
        ("scale_attn_by_inverse_layer_idx", config.get("scale_attn_by_inverse_layer_idx", False), "true"),
        ("add_cross_attention", config.get("add_cross_attention", False), "true"),
        ("tie_word_embeddings", config.get("tie_word_embeddings", True) is not True, "false"),
    ]
    for field, bad, shown in unsupported:
        if bad:
            raise GptlabError(f"{directory}/config.json: {field} = {shown} is not supported by gptlab's GPT")
    try:
        embed_dim = int(config["n_embd"])
        n_inner = config.get("n_inner") or 4 * embed_dim
        if n_inner % embed_dim:
            raise GptlabError(
                f"{directory}/config.json: n_inner {n_inner} is not a multiple of n_embd {embed_dim}; "
                "gptlab cannot build that MLP"
            )
        return ModelConfig(
            embed_dim=embed_dim,
            n_heads=int(config["n_head"]),
            num_layers=int(config["n_layer"]),
            seq_len=int(config["n_positions"]),
            tgt_vocab_size=int(config["vocab_size"]),
            expansion_factor=n_inner // embed_dim,
            dropout=float(config.get("resid_pdrop", 0.1)),
            norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            bias=True,
            pos_encoding="learned",
            norm="layernorm",
            activation="gelu",
            tie_embeddings=True,
        )
    except KeyError as missing:
        raise GptlabError(f"{directory}/config.json lacks {missing}; download the model again") from None
    except (TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        first = str(error).strip().splitlines()[0]
        raise GptlabError(
            f"{directory}/config.json holds an invalid size ({first}); download the model again"
        ) from None


# ---- weights ----------------------------------------------------------------------------------
def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict in model.safetensors (one file or shards) or pytorch_model.bin."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise GptlabError(f"{index} is not a valid safetensors index; download the model again") from None
        # A shard is a file beside the index: a name with a folder part ("../x", "/etc/x") is refused.
        outside = [shard for shard in shards if Path(shard).name != shard or shard in ("", ".", "..")]
        if outside:
            raise GptlabError(
                f"{index} names shard {outside[0]!r}, which is not a file in {directory}; download the model again"
            )
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state |= _load_safetensors(directory / shard)
        return state
    pickled = directory / "pytorch_model.bin"
    if pickled.is_file():
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)  # tensors only, never code
        except Exception as error:  # noqa: BLE001 - torch raises many types for foreign or unsafe files
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise GptlabError(
                f"{pickled} is not a plain tensor file gptlab will load ({reason}); use model.safetensors"
            ) from None
    raise GptlabError(f"{directory} has no model.safetensors or pytorch_model.bin; download the weights too")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise GptlabError(f"weights file {path} is missing; download the model again")
    try:
        return require("safetensors.torch").load_file(str(path))
    except GptlabError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for bad files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise GptlabError(f"{path} is not a readable safetensors file ({reason}); download the model again") from None


def check_shapes(state: dict[str, torch.Tensor], config: ModelConfig, directory: Path) -> None:
    """GptlabError if config.json's sizes do not describe these weights (named by field)."""
    weights = {key.removeprefix("transformer."): value for key, value in state.items()}
    C, inner = config.embed_dim, config.expansion_factor * config.embed_dim
    for name, shape, fields in [
        ("wte.weight", (config.tgt_vocab_size, C), "vocab_size, n_embd"),
        ("wpe.weight", (config.seq_len, C), "n_positions, n_embd"),
        ("h.0.mlp.c_fc.weight", (C, inner), "n_embd, n_inner"),
    ]:
        if name not in weights:
            raise GptlabError(f"{directory}: weight {name} is missing; this is not a complete GPT-2 checkpoint")
        if tuple(weights[name].shape) != shape:
            raise GptlabError(
                f"{directory}: weight {name} has shape {tuple(weights[name].shape)} but config.json ({fields}) "
                f"says {shape}; the config and the weights belong to different models"
            )
    layers = {int(key.split(".")[1]) for key in weights if key.startswith("h.")}
    if layers != set(range(config.num_layers)):
        raise GptlabError(
            f"{directory}: the weights hold {len(layers)} layers but config.json says n_layer = {config.num_layers}; "
            "the config and the weights belong to different models"
        )


# ---- tokenizer --------------------------------------------------------------------------------
def read_gpt2_tokenizer(directory: Path) -> TiktokenTokenizer:
    """GPT-2's vocab.json + merges.txt (+ added_tokens.json) as a tokenizer with GPT-2's ids and
    split pattern. Tokens that are neither a byte nor a merge (<|endoftext|>) are special."""
    files = {name: directory / name for name in ("vocab.json", "merges.txt")}
    for name, path in files.items():
        if not path.is_file():
            raise GptlabError(f"{directory} has no {name}; download the tokenizer files too (vocab.json, merges.txt)")
    try:
        entries = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{files['vocab.json']} is not valid JSON ({error}); download the tokenizer again") from None
    if not isinstance(entries, dict) or not all(isinstance(i, int) for i in entries.values()):
        raise GptlabError(f"{files['vocab.json']} must map token text to integer ids; download the tokenizer again")
    merges = read_merges_txt(files["merges.txt"].read_bytes())
    made = {left + right for left, right in merges} | {bytes([b]) for b in range(256)}

    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for text, token_id in entries.items():
        try:
            token = text_to_token(text, "vocab.json")
        except GptlabError:
            token = None
        if token in made:
            ranks[token] = token_id
        else:
            specials[text] = token_id
    specials |= _added_tokens(directory)
    _check_gpt2_order(ranks, merges, directory)
    pattern, _ = KNOWN_ENCODINGS["gpt2"]
    return TiktokenTokenizer(f"hf-{directory.resolve().name}", ranks, pattern, specials)


def _added_tokens(directory: Path) -> dict[str, int]:
    path = directory / "added_tokens.json"
    if not path.is_file():
        return {}
    try:
        added = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{path} is not valid JSON ({error}); download the tokenizer again") from None
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise GptlabError(f"{path} must map token text to integer ids; download the tokenizer again")
    return added


def _check_gpt2_order(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], directory: Path) -> None:
    """tiktoken merges the pair whose joined token has the lowest id, GPT-2 the pair listed
    first in merges.txt; they agree when merge i makes a token of a higher id than merge i-1."""
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:
        raise GptlabError(f"{directory}/vocab.json lacks the byte {missing}; it is not a byte-level BPE vocabulary")
    previous = -1
    for line, (left, right) in enumerate(merges, start=2):
        if left not in ranks or right not in ranks or ranks.get(left + right, -1) <= previous:
            raise GptlabError(
                f"{directory}/merges.txt line {line} does not match vocab.json (its parts or its result are missing, "
                "or ids do not rise with merge order); use the tokenizer files that came with the model"
            )
        previous = ranks[left + right]
    if len(set(ranks.values())) != len(ranks):
        raise GptlabError(f"{directory}/vocab.json gives two tokens the same id; download the tokenizer again")


# ---- the four special tokens ------------------------------------------------------------------
def with_special_rows(model: GPT, tokenizer: Tokenizer) -> GPT:
    """`model` with rows for our special tokens in its (tied) embedding: <EOS> a copy of
    <|endoftext|>, <PAD> <UNK> <BOS> the mean embedding of GPT-2's tokens. They are new rows, or
    GPT-2's unused padding rows when its config rounds the table up. Logits of GPT-2's ids are unchanged."""
    old_rows = model.config.tgt_vocab_size
    rows = max(old_rows, tokenizer.vocab_size)
    ours = [tokenizer.special_tokens[name] for name in SPECIAL_TOKENS]  # the ids after GPT-2's own
    state = model.state_dict()
    old = state.pop("wte.weight")  # (old_rows, C)
    state.pop("lm_head.weight")  # tied: the same matrix
    new = torch.cat([old, old.new_zeros(rows - old_rows, old.size(1))])  # (rows, C)
    new[ours] = old[: min(ours)].mean(dim=0)
    separator = tokenizer.special_tokens.get(GPT2_SEPARATOR)
    if separator is not None:
        new[tokenizer.special_tokens[EOS]] = old[separator]
    if rows > old_rows:
        model = GPT(ModelConfig(**(model.config.model_dump() | {"tgt_vocab_size": rows}))).train(model.training)
    state["wte.weight"] = state["lm_head.weight"] = new
    model.load_state_dict(state)
    return model
