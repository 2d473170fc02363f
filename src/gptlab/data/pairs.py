"""Paired data for encoder-decoder models: `source<TAB>target` (TSV) or `{"source": ..., "target": ...}`
(JSONL) lines -> token ids -> padded, masked batches.

A target is read by the decoder as `<BOS> t1 .. tn` and predicted as `t1 .. tn <EOS>`; both are
cut to seq_len, and sources to max_source_len, with a warning. Batches are padded on the right
with <PAD>, and padded label positions hold IGNORE_INDEX so that the loss ignores them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.models.fused_loss import IGNORE_INDEX
from gptlab.tokenizers.base import Tokenizer

_JSONL_SUFFIXES = (".jsonl", ".json")


def read_pairs(path: str | Path, skip_bad_lines: bool = False) -> list[tuple[str, str]]:
    """(source, target) pairs of a TSV or JSONL file (by suffix: .jsonl/.json, anything else TSV).

    Empty lines are ignored. A line without a tab, with an empty side or with bad JSON raises
    GptlabError naming its line number, or is skipped with one warning listing them all when
    `skip_bad_lines`.
    """
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"paired data file {path} not found; pass a .tsv (source<TAB>target) or .jsonl file")
    parse = _parse_json_line if path.suffix.lower() in _JSONL_SUFFIXES else _parse_tsv_line
    pairs: list[tuple[str, str]] = []
    bad: list[tuple[int, str]] = []  # (line number, problem)
    try:
        with path.open(encoding="utf-8-sig") as lines:  # -sig: a leading byte-order mark is dropped
            for number, line in enumerate(lines, start=1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                pair, problem = parse(line)
                if problem is not None:
                    if not skip_bad_lines:
                        raise GptlabError(f"{path} line {number}: {problem}; fix it or pass --skip_bad_lines")
                    bad.append((number, problem))
                else:
                    pairs.append(pair)
    except UnicodeDecodeError as err:
        raise GptlabError(f"{path} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    if bad:
        numbers = ", ".join(str(number) for number, _ in bad[:10]) + (" ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} bad line(s) (line {numbers}; first: {bad[0][1]})", stacklevel=2)
    if not pairs:
        raise GptlabError(f"{path} holds no source/target pairs; write one `source<TAB>target` per line")
    return pairs


def _parse_tsv_line(line: str) -> tuple[tuple[str, str], str | None]:
    if "\t" not in line:
        return ("", ""), "no tab between source and target"
    source, target = line.split("\t", 1)  # a target may itself hold tabs
    return _check_sides(source, target)


def _parse_json_line(line: str) -> tuple[tuple[str, str], str | None]:
    try:
        record = json.loads(line)
    except ValueError:
        return ("", ""), "not valid JSON"
    except RecursionError:  # json recurses once per level of nesting
        return ("", ""), "JSON nested too deeply"
    if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("source", "target")):
        return ("", ""), 'not a {"source": "...", "target": "..."} object'
    return _check_sides(record["source"], record["target"])


def _check_sides(source: str, target: str) -> tuple[tuple[str, str], str | None]:
    empty = [side for side, text in (("source", source), ("target", target)) if not text.strip()]
    if empty:
        return (source, target), f"empty {' and '.join(empty)}"
    return (source, target), None


@dataclass
class PairBatch:
    """A padded batch of pairs: the encoder's input, the decoder's input and its labels."""

    src: torch.Tensor  # (B, S) source ids, <PAD> after the end
    src_mask: torch.Tensor  # (B, S) True at real source tokens
    tgt: torch.Tensor  # (B, T) <BOS> t1 .. tn, <PAD> after the end
    labels: torch.Tensor  # (B, T) t1 .. tn <EOS>, IGNORE_INDEX after the end
    indices: tuple[int, ...]  # which pairs of the dataset, row by row
    num_tokens: int  # real (unpadded) source and target tokens

    def to(self, device: torch.device | str) -> PairBatch:
        tensors = (t.to(device, non_blocking=True) for t in (self.src, self.src_mask, self.tgt, self.labels))
        return PairBatch(*tensors, indices=self.indices, num_tokens=self.num_tokens)


class PairDataset:
    """Tokenized pairs, batched on demand: `batch(indices)` pads the chosen pairs together.

    Has the same `len()` / `batch(indices)` / `num_tokens` / `bytes_per_token` surface as
    TokenDataset, so the same batch iterator serves both.
    """

    def __init__(
        self, pairs: list[tuple[str, str]], tokenizer: Tokenizer, max_source_len: int, seq_len: int, name: str = "data"
    ):
        self.pad_id = tokenizer.pad_id
        sources = tokenizer.encode_batch([source for source, _ in pairs])
        targets = tokenizer.encode_batch([target for _, target in pairs])
        long_sources = sum(len(ids) > max_source_len for ids in sources)
        long_targets = sum(len(ids) + 1 > seq_len for ids in targets)  # + 1 for <EOS>
        if long_sources:
            warnings.warn(
                f"{name}: {long_sources} source(s) longer than max_source_len={max_source_len} tokens were "
                "truncated; raise --max_source_len to keep them whole",
                stacklevel=2,
            )
        if long_targets:
            warnings.warn(
                f"{name}: {long_targets} target(s) longer than seq_len={seq_len} tokens (with <EOS>) were "
                "truncated; raise --seq_len to keep them whole",
                stacklevel=2,
            )
        self.sources = [ids[:max_source_len] for ids in sources]
        self.decoder_inputs = [([tokenizer.bos_id] + ids)[:seq_len] for ids in targets]
        self.labels = [(ids + [tokenizer.eos_id])[:seq_len] for ids in targets]
        self.references = [ids[:seq_len] for ids in targets]
        self.num_tokens = sum(map(len, self.sources)) + sum(map(len, self.labels))
        label_count = sum(map(len, self.labels))
        self.bytes_per_token = sum(len(t.encode("utf-8")) for _, t in pairs) / max(label_count, 1)

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: Tokenizer, max_source_len: int, seq_len: int, skip_bad_lines: bool = False
    ) -> PairDataset:
        """The pairs of a TSV/JSONL file (see read_pairs), tokenized."""
        return cls(read_pairs(path, skip_bad_lines), tokenizer, max_source_len, seq_len, name=str(path))

    def __len__(self) -> int:
        return len(self.sources)

    def reference(self, index: int) -> list[int]:
        """The target ids an exact decode of pair `index` produces (before its <EOS>)."""
        return self.references[index]

    def batch(self, indices: np.ndarray) -> PairBatch:
        """The pairs at `indices`, padded to the longest source and target among them."""
        indices = tuple(int(i) for i in indices)
        sources, labels = [self.sources[i] for i in indices], [self.labels[i] for i in indices]
        return PairBatch(
            src=pad(sources, self.pad_id),
            src_mask=pad_mask(sources),
            tgt=pad([self.decoder_inputs[i] for i in indices], self.pad_id),
            labels=pad(labels, IGNORE_INDEX),
            indices=indices,
            num_tokens=sum(map(len, sources)) + sum(map(len, labels)),
        )


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Rows of ids, right-padded with `value` to the longest: (len(rows), longest) int64."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_mask(rows: list[list[int]]) -> torch.Tensor:
    """True at the real positions of right-padded rows: (len(rows), longest) bool."""
    lengths = torch.tensor([len(row) for row in rows])
    return torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
