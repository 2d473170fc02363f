"""Presets: the config files shipped in `configs/`, found by name, and the tokenizer each recommends.

A preset is an ordinary config file (see gptlab.config.read_config_file) that may also hold a
`tokenizer:` mapping, which is not a config field: it says which tokenizer the recipe was
measured with, e.g.

    tokenizer:
      type: default      # default (our BPE), sentencepiece or char
      vocab_size: 2048   # ids in total, the 4 special tokens included (not for char)

load_preset() strips that mapping and returns it separately as a TokenizerRecipe.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.config import SECTIONS, read_config_file
from gptlab.errors import GptlabError
from gptlab.tokenizers import KINDS, Tokenizer, train_tokenizer

# Shipped inside the package (so that a wheel has them); `configs` at the project root links here.
PRESETS_DIR = Path(__file__).resolve().parent / "configs"
PRESET_SUFFIXES = (".yaml", ".yml", ".json")
TOKENIZER_KEY = "tokenizer"
# A recipe is trained on the user's text; a pretrained tiktoken encoding is passed as --tokenizer NAME.
RECIPE_KINDS = tuple(kind for kind in KINDS if kind != "tiktoken")


@dataclass(frozen=True)
class TokenizerRecipe:
    """The tokenizer a preset was designed for: its kind, size and (for `default`) split pattern."""

    kind: str
    vocab_size: int | None = None
    pattern: str = "gpt4"

    def train(self, texts: Iterable[str], progress: bool = False) -> Tokenizer:
        """Train this tokenizer on `texts`."""
        return train_tokenizer(self.kind, texts, self.vocab_size, self.pattern, progress=progress)

    def train_command(self, corpus: str, out: str) -> str:
        """The `gptlab tokenizer train` command line that trains this tokenizer on `corpus` into `out`."""
        flags = [f"--type {self.kind}"] if self.kind != "default" else []
        flags += [f"--vocab_size {self.vocab_size}"] if self.vocab_size is not None else []
        flags += [f"--pattern {self.pattern}"] if self.kind == "default" and self.pattern != "gpt4" else []
        return " ".join(["gptlab tokenizer train", corpus, *flags, "--out", out])

    def describe(self) -> str:
        """'char' or 'default, vocab 2048'."""
        return self.kind if self.vocab_size is None else f"{self.kind}, vocab {self.vocab_size}"


@dataclass(frozen=True)
class Preset:
    """A config file read into config values plus its tokenizer recipe (None when it names none)."""

    path: Path
    values: dict[str, Any]
    tokenizer: TokenizerRecipe | None

    @property
    def name(self) -> str:
        return self.path.stem


def list_presets() -> list[str]:
    """Names of the presets shipped in configs/, sorted."""
    if not PRESETS_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESETS_DIR.iterdir() if p.suffix in PRESET_SUFFIXES and p.is_file())


def resolve_config(name_or_path: str | Path) -> Path:
    """The config file for a path that exists, or for a preset name: `cpu-10min`,
    `cpu-10min.yaml` or `configs/cpu-10min.yaml` (from any working directory).

    An unknown name raises GptlabError naming its close matches and every preset.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.stem if path.suffix in PRESET_SUFFIXES else path.name
    for suffix in PRESET_SUFFIXES:
        candidate = PRESETS_DIR / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    presets = list_presets()
    close = difflib.get_close_matches(name, presets, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise GptlabError(
        f"config {str(name_or_path)!r} is neither a file nor a preset; {hint}"
        f"presets: {', '.join(presets) or 'none found in ' + str(PRESETS_DIR)}"
    )


def load_preset(name_or_path: str | Path) -> Preset:
    """Read a preset or config file: its config values (checked to be config fields, with close
    matches named for any that is not) and its tokenizer recipe."""
    path = resolve_config(name_or_path)
    values = read_config_file(path)
    recipe = _read_recipe(values.pop(TOKENIZER_KEY, None), path)
    unknown = sorted(set(values) - set(config_field_names()))
    if unknown:
        raise GptlabError(f"{path}: unknown config field(s): {suggest_fields(unknown)}")
    return Preset(path=path, values=values, tokenizer=recipe)


def config_field_names() -> list[str]:
    """Every field of the model, data and train configs."""
    return [name for cls in SECTIONS.values() for name in cls.model_fields]


def suggest_fields(unknown: Iterable[str]) -> str:
    """The unknown field names, each with its close matches among the config fields:
    'embed_dm (did you mean embed_dim?), lr (did you mean ...?)'."""
    fields = config_field_names()
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
        described.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
    return ", ".join(described)


def _read_recipe(raw: Any, path: Path) -> TokenizerRecipe | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "type" not in raw:
        raise GptlabError(f"{path}: `tokenizer:` must be a mapping with a type (one of {', '.join(RECIPE_KINDS)})")
    unknown = sorted(set(raw) - {"type", "vocab_size", "pattern"})
    if unknown:
        raise GptlabError(f"{path}: unknown tokenizer key(s) {', '.join(unknown)}; use type, vocab_size, pattern")
    kind, vocab_size = raw["type"], raw.get("vocab_size")
    if kind not in RECIPE_KINDS:
        raise GptlabError(f"{path}: tokenizer type {kind!r} cannot be trained; use one of {', '.join(RECIPE_KINDS)}")
    if kind == "char" and vocab_size is not None:
        raise GptlabError(f"{path}: a char tokenizer takes its size from the text; remove tokenizer.vocab_size")
    if kind in ("default", "sentencepiece") and (type(vocab_size) is not int or vocab_size <= 0):
        raise GptlabError(f"{path}: a {kind} tokenizer needs tokenizer.vocab_size, a positive integer")
    return TokenizerRecipe(kind=kind, vocab_size=vocab_size, pattern=str(raw.get("pattern", "gpt4")))
