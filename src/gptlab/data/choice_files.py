"""Multiple-choice evaluation sets in JSONL: HellaSwag's published format and a generic one.

One JSON object a line (blank lines are skipped); the format is chosen per line, `endings`
meaning HellaSwag:

- generic: {"context": str, "choices": [str, ...], "answer": int (0-based)}
- HellaSwag (github.com/rowanz/hellaswag, data/hellaswag_val.jsonl, read as is): `ctx_a`, `ctx_b`,
  `activity_label`, `endings`, `label` (an int, or a digit string as in the Hugging Face copy),
  prepared as lm-evaluation-harness prepares it (lm_eval/tasks/hellaswag/utils.py):
  context = clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
  [clean(e) for e in endings], where clean strips the text, turns " [title]" into ". ", drops
  any other "[...]" (WikiHow artefacts) and turns double spaces into single ones. A line with
  `ctx` but no ctx_a/ctx_b uses `ctx`; one without activity_label gets no prefix.

Any bad line is a GptlabError naming the file and line number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

GENERIC_FIELDS = ("context", "choices", "answer")
HELLASWAG_FIELDS = ("endings", "label")


@dataclass(frozen=True)
class ChoiceItem:
    """One question: the context, its candidate continuations, the index of the right one, and
    the 1-based line of the file it came from (for messages)."""

    context: str
    choices: tuple[str, ...]
    answer: int
    line: int


def hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's `preprocess` for HellaSwag text."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_choice_file(path: str | Path) -> list[ChoiceItem]:
    """Every item of the JSONL file at `path`; GptlabError for a missing file, an empty one, or
    the first bad line (named as path:line)."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"multiple-choice file {path} not found")
    items = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GptlabError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise GptlabError(f"{where}: not valid JSON ({error.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise GptlabError(f"{where}: not a JSON object; write one object per line")
        items.append(
            _hellaswag_item(record, where, number) if "endings" in record else _generic_item(record, where, number)
        )
    if not items:
        raise GptlabError(f"{path} holds no items; write one JSON object per line")
    return items


def _generic_item(record: dict[str, Any], where: str, number: int) -> ChoiceItem:
    missing = [name for name in GENERIC_FIELDS if name not in record]
    if missing:
        raise GptlabError(
            f'{where}: missing field {missing[0]!r}; write {{"context", "choices", "answer"}} '
            "(or HellaSwag's ctx/endings/label)"
        )
    context = record["context"]
    if not isinstance(context, str):
        raise GptlabError(f"{where}: field 'context' must be a string")
    choices = _choices(record["choices"], "choices", where)
    answer = record["answer"]
    if type(answer) is not int:
        raise GptlabError(f"{where}: field 'answer' must be an integer (the 0-based index of the right choice)")
    return ChoiceItem(context, choices, _in_range(answer, "answer", len(choices), where), number)


def _hellaswag_item(record: dict[str, Any], where: str, number: int) -> ChoiceItem:
    if "label" not in record:
        raise GptlabError(f"{where}: missing field 'label'; HellaSwag lines need ctx, endings and label")
    if "ctx_a" in record and "ctx_b" in record:
        parts = [record["ctx_a"], record["ctx_b"]]
        if not all(isinstance(part, str) for part in parts):
            raise GptlabError(f"{where}: fields 'ctx_a' and 'ctx_b' must be strings")
        context = parts[0] + " " + parts[1].capitalize()
    elif isinstance(record.get("ctx"), str):
        context = record["ctx"]
    else:
        raise GptlabError(f"{where}: missing field 'ctx' (or 'ctx_a' and 'ctx_b'); HellaSwag lines need a context")
    label = record.get("activity_label")
    if label is not None:
        if not isinstance(label, str):
            raise GptlabError(f"{where}: field 'activity_label' must be a string")
        context = label + ": " + context
    choices = tuple(hellaswag_clean(ending) for ending in _choices(record["endings"], "endings", where))
    empty = next((i for i, choice in enumerate(choices) if not choice), None)
    if empty is not None:
        raise GptlabError(f"{where}: ending {empty} is empty once cleaned as lm-eval cleans HellaSwag text")
    answer = record["label"]
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)  # the Hugging Face copy stores labels as strings
    elif answer == "":
        raise GptlabError(f"{where}: no label (HellaSwag's test split keeps them private); use hellaswag_val.jsonl")
    if type(answer) is not int:
        raise GptlabError(f"{where}: field 'label' must be an integer (the 0-based index of the right ending)")
    return ChoiceItem(hellaswag_clean(context), choices, _in_range(answer, "label", len(choices), where), number)


def _choices(value: Any, name: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(choice, str) for choice in value):
        raise GptlabError(f"{where}: field {name!r} must be a list of strings")
    if len(value) < 2:
        raise GptlabError(f"{where}: field {name!r} has {len(value)} choice(s); a question needs at least 2")
    empty = next((i for i, choice in enumerate(value) if not choice.strip()), None)
    if empty is not None:
        raise GptlabError(f"{where}: choice {empty} of {name!r} is empty; every choice needs some text")
    return tuple(value)


def _in_range(answer: int, name: str, count: int, where: str) -> int:
    if not 0 <= answer < count:
        raise GptlabError(f"{where}: {name} {answer} is out of range for {count} choices (0..{count - 1})")
    return answer
