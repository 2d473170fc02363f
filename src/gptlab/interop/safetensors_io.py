"""gptlab's own weights directory: `model.safetensors` + `config.json` + `tokenizer/`.

It holds any GPT gptlab can build (also those transformers has no class for) and, unlike a
`.pth` checkpoint, no optimizer state and nothing that needs unpickling:

    config.json   {"format": "gptlab-safetensors", "version": 1, "model_type": "gpt",
                   "model_config": {...}, "data_config": {...} | null, "train_config": {...} | null,
                   "tokenizer": {"kind": str, "files": [name, ...]}}
    model.safetensors   the state dict; a tied output head is stored once, as wte.weight
    tokenizer/    the tokenizer's own files (Tokenizer.to_files())
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig, validated_from
from gptlab.errors import GptlabError
from gptlab.interop.deps import require
from gptlab.interop.staging import staged_directory
from gptlab.models import GPT
from gptlab.tokenizers import tokenizer_from_files
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint import build_with_weights

FORMAT = "gptlab-safetensors"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR = "config.json", "model.safetensors", "tokenizer"
TIED_HEAD = "lm_head.weight"  # the same tensor as wte.weight when embeddings are tied


def export_safetensors(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | Path,
    data_cfg: DatasetConfig | None = None,
    train_cfg: TrainConfig | None = None,
    force: bool = False,
) -> Path:
    """Write `model` and `tokenizer` as a gptlab safetensors directory `out`, all at once.

    A non-empty `out` is refused unless `force`; on any error nothing at `out` changes.
    """
    safetensors_torch = require("safetensors.torch")
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model_type": "gpt",
        "model_config": model.config.model_dump(),
        "data_config": data_cfg.model_dump() if data_cfg is not None else None,
        "train_config": train_cfg.model_dump() if train_cfg is not None else None,
        "tokenizer": {"kind": tokenizer.kind, "files": sorted(tokenizer.to_files())},
    }
    with staged_directory(out, force) as staging:
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        safetensors_torch.save_file(weights_to_save(model), staging / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save(staging / TOKENIZER_DIR)
    return Path(out)


def weights_to_save(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as safetensors wants it: contiguous CPU tensors, each stored once."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        del state[TIED_HEAD]  # safetensors refuses two names for one tensor
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def is_safetensors_dir(path: str | Path) -> bool:
    """Whether `path` is a directory that looks like export_safetensors() wrote it."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_safetensors_dir(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer, ModelConfig]:
    """The GPT (on `device`, in eval mode), tokenizer and model config stored by export_safetensors().

    Raises GptlabError naming the missing or inconsistent file.
    """
    directory = Path(directory)
    config = read_config(directory)
    model_cfg = validated_from(
        ModelConfig, config.get("model_config"), directory / CONFIG_FILE, "export the directory again"
    )
    tokenizer = _read_tokenizer(directory, config.get("tokenizer"))
    if model_cfg.tgt_vocab_size is None or model_cfg.tgt_vocab_size < tokenizer.vocab_size:
        raise GptlabError(
            f"{directory}: model vocabulary ({model_cfg.tgt_vocab_size}) is smaller than its tokenizer's "
            f"({tokenizer.vocab_size}); export the directory again"
        )
    state = _read_weights(directory / WEIGHTS_FILE)
    if model_cfg.tie_embeddings and TIED_HEAD not in state and "wte.weight" in state:
        state[TIED_HEAD] = state["wte.weight"]
    model = build_with_weights(GPT, model_cfg, state, directory / WEIGHTS_FILE, device)
    return model, tokenizer, model_cfg


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a gptlab safetensors directory, checked to be one."""
    if not directory.is_dir():
        raise GptlabError(f"model directory {directory} not found; check the path")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise GptlabError(f"{directory} has no {CONFIG_FILE}; export it with gptlab export --format safetensors")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{path} is not valid JSON ({error}); export the directory again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        from_hf = isinstance(config, dict) and "model_type" in config
        hint = " (a Hugging Face model: import it with --init_from)" if from_hf else ""
        raise GptlabError(
            f"{directory} is not a gptlab safetensors directory{hint}; export one with gptlab export --format safetensors"
        )
    if not isinstance(config.get("version"), int) or config["version"] > VERSION:
        raise GptlabError(
            f"{path} has version {config.get('version')!r}, this gptlab reads up to {VERSION}; upgrade gptlab"
        )
    return config


def _read_tokenizer(directory: Path, entry: Any) -> Tokenizer:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("kind"), str)
        or not isinstance(entry.get("files"), list)
    ):
        raise GptlabError(f"{directory / CONFIG_FILE} lacks a valid tokenizer entry; export the directory again")
    folder = directory / TOKENIZER_DIR
    if not all(isinstance(name, str) and name == Path(name).name for name in entry["files"]):
        raise GptlabError(
            f"{directory / CONFIG_FILE} names tokenizer files outside {folder}; export the directory again"
        )
    missing = [name for name in entry["files"] if not (folder / name).is_file()]
    if missing:
        raise GptlabError(f"tokenizer file {folder / missing[0]} is missing; export the directory again")
    return tokenizer_from_files(entry["kind"], {name: (folder / name).read_bytes() for name in entry["files"]})


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    safetensors_torch = require("safetensors.torch")
    if not path.is_file():
        raise GptlabError(f"weights file {path} is missing; export the directory again")
    try:
        return safetensors_torch.load_file(str(path))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for bad files
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise GptlabError(f"{path} is not a readable safetensors file ({reason}); export the directory again") from None
