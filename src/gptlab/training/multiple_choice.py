"""Scoring multiple-choice items by log-likelihood, as lm-evaluation-harness scores them.

Each choice is the continuation " " + choice of the item's context (lm-eval's default target
delimiter); its score is the summed log-probability of the continuation's tokens given the
context. `acc` is the fraction of items whose highest-scoring choice is the answer; `acc_norm`
ranks by score / len(choice) instead, the choice's length in characters without the delimiter
(lm-eval's acc_norm), so that long endings are not penalised for their length.

Tokens follow lm-eval's Hugging Face model: trailing whitespace of the context moves to the
continuation; the continuation's ids are those of encode(context + continuation) after the first
len(encode(context)); an empty context is one separator token (`prefix_id`). When context and
continuation exceed the model's context, the context loses its first tokens: the model reads
the last seq_len + 1 ids but the final one.

Rows are batched longest first and right padded. A causal model's logits at a row's own positions
do not depend on the pads after them, so batching leaves every score as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gptlab.data.choice_files import ChoiceItem, read_choice_file
from gptlab.device import autocast, sum_dtype
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer

DELIMITER = " "


@dataclass(frozen=True)
class ChoiceRequest:
    """One (item, choice) row: ids = context (left-truncated) + continuation, at most seq_len + 1."""

    item: int
    ids: list[int]
    continuation: int  # the last this many ids are scored


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy and length-normalised accuracy over `items` items, with their standard errors
    (sample standard deviation / sqrt(n), as lm-eval reports), and per item the choices'
    log-likelihoods and the choice each metric picked."""

    items: int
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    loglikelihoods: list[list[float]]
    predictions: list[int]
    predictions_norm: list[int]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's Hugging Face model forms them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    # lm-eval slices the whole text's ids, also when a merge crosses the boundary; should that
    # swallow the continuation whole, its own ids are scored instead.
    continuation_ids = whole[len(context_ids) :] or tokenizer.encode(continuation)
    return context_ids or [prefix_id], continuation_ids


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (as numpy.argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_metrics(items: Sequence[ChoiceItem], loglikelihoods: Sequence[Sequence[float]]) -> ChoiceResult:
    """acc and acc_norm of the items given each choice's log-likelihood."""
    predictions = [argmax(lls) for lls in loglikelihoods]
    predictions_norm = [
        argmax([ll / len(choice) for ll, choice in zip(lls, item.choices)]) for item, lls in zip(items, loglikelihoods)
    ]
    hits = [float(p == item.answer) for p, item in zip(predictions, items)]
    hits_norm = [float(p == item.answer) for p, item in zip(predictions_norm, items)]
    return ChoiceResult(
        items=len(items),
        acc=_mean(hits),
        acc_norm=_mean(hits_norm),
        acc_stderr=_stderr(hits),
        acc_norm_stderr=_stderr(hits_norm),
        loglikelihoods=[list(lls) for lls in loglikelihoods],
        predictions=predictions,
        predictions_norm=predictions_norm,
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


class ChoiceTask:
    """A multiple-choice set tokenized once for a model of context `seq_len`; evaluate() scores it."""

    def __init__(
        self,
        items: Sequence[ChoiceItem],
        tokenizer: Tokenizer,
        seq_len: int,
        prefix_id: int | None = None,
        source: str = "",
    ):
        self.items = list(items)
        self.pad_id = tokenizer.pad_id
        prefix = tokenizer.eos_id if prefix_id is None else prefix_id
        self.requests: list[ChoiceRequest] = []
        for index, item in enumerate(self.items):
            for number, choice in enumerate(item.choices):
                context_ids, continuation_ids = encode_pair(tokenizer, item.context, DELIMITER + choice, prefix)
                if len(continuation_ids) > seq_len:
                    raise GptlabError(
                        f"{source}:{item.line}: choice {number} is {len(continuation_ids)} tokens, longer than the "
                        f"model's context (seq_len={seq_len}); shorten it"
                    )
                ids = (context_ids + continuation_ids)[-(seq_len + 1) :]  # left truncation, as lm-eval
                self.requests.append(ChoiceRequest(index, ids, len(continuation_ids)))

    @classmethod
    def from_file(
        cls, path: str | Path, tokenizer: Tokenizer, seq_len: int, prefix_id: int | None = None
    ) -> ChoiceTask:
        """The items of a JSONL file (data/choice_files.py), tokenized; GptlabError naming a bad line."""
        return cls(read_choice_file(path), tokenizer, seq_len, prefix_id, source=str(path))

    @torch.no_grad()
    def loglikelihoods(
        self,
        model: nn.Module,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        exclude_ids: Sequence[int] = (),
        progress: bool = False,
    ) -> list[list[float]]:
        """Each item's choices' log-likelihoods under `model` (called as model(ids) -> (logits, _)),
        `batch_size` rows at a time, under autocast to `dtype` (default: the device's usual).
        `exclude_ids` are ids left out of the softmax: rows the model's source never had."""
        device = torch.device(device)
        was_training = model.training
        model.eval()
        order = sorted(range(len(self.requests)), key=lambda i: -len(self.requests[i].ids))  # longest first
        scores = torch.zeros(len(self.requests), dtype=sum_dtype(device), device=device)
        excluded = torch.tensor(list(exclude_ids), dtype=torch.long, device=device)
        bar = tqdm(total=len(order), unit="choice", disable=not progress, dynamic_ncols=True, desc="scoring")
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                scores[rows] = self._score_batch(model, [self.requests[i] for i in rows], device, dtype, excluded)
                bar.update(len(rows))
        finally:
            bar.close()
            model.train(was_training)
        flat = scores.tolist()
        grouped: list[list[float]] = [[] for _ in self.items]
        for request, score in zip(self.requests, flat):
            grouped[request.item].append(score)
        return grouped

    def _score_batch(
        self, model: nn.Module, batch: list[ChoiceRequest], device: torch.device, dtype, excluded: torch.Tensor
    ) -> torch.Tensor:
        """Summed log-probabilities of each request's continuation, (B,)."""
        B, T = len(batch), max(len(r.ids) for r in batch) - 1
        x = torch.full((B, T), self.pad_id, dtype=torch.long)  # (B, T), right padded
        targets = torch.full((B, T), -1, dtype=torch.long)  # (B, T), -1 where nothing is scored
        for row, request in enumerate(batch):
            n, k = len(request.ids), request.continuation
            x[row, : n - 1] = torch.as_tensor(request.ids[:-1])
            targets[row, n - 1 - k : n - 1] = torch.as_tensor(request.ids[-k:])  # position t predicts id t+1
        x, targets = x.to(device), targets.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)  # (B, T, V)
        scored = targets >= 0  # (B, T)
        picked = logits[scored].float()  # (N, V): only the continuations' positions, in float32
        if excluded.numel():
            picked[:, excluded] = -math.inf
        logp = picked.log_softmax(dim=-1).gather(1, targets[scored].unsqueeze(1)).squeeze(1)  # (N,)
        rows = torch.arange(B, device=device).unsqueeze(1).expand(B, T)[scored]  # (N,)
        return torch.zeros(B, dtype=sum_dtype(device), device=device).index_add_(0, rows, logp.to(sum_dtype(device)))

    def evaluate(
        self,
        model: nn.Module,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        exclude_ids: Sequence[int] = (),
        progress: bool = False,
    ) -> ChoiceResult:
        """acc and acc_norm of `model` on the set (see loglikelihoods for the arguments)."""
        return choice_metrics(self.items, self.loglikelihoods(model, batch_size, device, dtype, exclude_ids, progress))
