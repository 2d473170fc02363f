"""Where a run's checkpoints live, which one is the latest, which old ones go, and its per-step log.

In <checkpoint_dir>:
    <experiment>_e<epoch>.pth      at epoch ends (every checkpoint_every epochs) and when the run stops
    <experiment>_s<step>.pth       every save_every_steps steps; only the newest keep_last are kept
    <experiment>_latest.json       {"checkpoint": file name, "step": int, "epoch": int}, rewritten
                                   atomically after each checkpoint is complete, so it never names
                                   a half-written file
In <log_dir>/<experiment>/:
    metrics.jsonl                  one JSON object per optimizer step (step, loss, lr, grad_norm ...)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TextIO

from gptlab.errors import GptlabError
from gptlab.files import write_atomic


def epoch_checkpoint(checkpoint_dir: Path, experiment: str, epoch: int) -> Path:
    return checkpoint_dir / f"{experiment}_e{epoch}.pth"


def step_checkpoint(checkpoint_dir: Path, experiment: str, step: int) -> Path:
    return checkpoint_dir / f"{experiment}_s{step}.pth"


def latest_pointer(checkpoint_dir: Path, experiment: str) -> Path:
    return checkpoint_dir / f"{experiment}_latest.json"


def write_latest(checkpoint_dir: Path, experiment: str, checkpoint: Path, step: int, epoch: int) -> None:
    """Point <experiment>_latest.json at `checkpoint` (call only once that file is complete)."""
    entry = {"checkpoint": checkpoint.name, "step": step, "epoch": epoch}
    write_atomic(latest_pointer(checkpoint_dir, experiment), (json.dumps(entry) + "\n").encode())


def find_latest(checkpoint_dir: Path, experiment: str) -> Path | None:
    """The checkpoint <experiment>_latest.json names, or None when there is no pointer yet.

    Raises GptlabError when the pointer is unreadable or names a file that is gone.
    """
    pointer = latest_pointer(checkpoint_dir, experiment)
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError):
        raise GptlabError(
            f"{pointer} is not a valid latest-checkpoint pointer; delete it or pass --resume PATH"
        ) from None
    path = checkpoint_dir / Path(name).name
    if not path.is_file():
        raise GptlabError(f"{pointer} names {path}, which no longer exists; pass --resume PATH of another checkpoint")
    return path


def resolve_resume(resume: str | Path | None, checkpoint_dir: Path, experiment: str) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume, or None; a line for the log or None): `resume` as given, or for
    "auto" the one <experiment>_latest.json names, none when there is no pointer yet."""
    if resume is None or str(resume) != "auto":
        return (None if resume is None else Path(resume)), None
    found = find_latest(checkpoint_dir, experiment)
    if found is None:
        return None, f"--resume auto: no {experiment}_latest.json in {checkpoint_dir}; starting fresh"
    return found, None


def prune_step_checkpoints(checkpoint_dir: Path, experiment: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints of `experiment`, never the one the
    latest pointer names. Returns the deleted paths."""
    pattern = re.compile(rf"^{re.escape(experiment)}_s(\d+)\.pth$")
    steps = sorted(
        (int(match.group(1)), path)
        for path in checkpoint_dir.glob(f"{experiment}_s*.pth")
        if (match := pattern.match(path.name))
    )
    pointer = latest_pointer(checkpoint_dir, experiment)
    protected = json.loads(pointer.read_text()).get("checkpoint") if pointer.is_file() else None
    doomed = [path for _, path in steps[: max(len(steps) - keep_last, 0)] if path.name != protected]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def remove_stale_temporaries(checkpoint_dir: Path, log_dir: Path, experiment: str) -> list[Path]:
    """Delete the temporary files a killed run of `experiment` left mid-write (files.atomic_path
    names them .<target>.<random>.tmp): its checkpoints' and pointer's in checkpoint_dir, and
    any in its own log_dir (<log_dir>/<experiment>/). Call before this run writes anything."""
    ours = re.compile(rf"^\.{re.escape(experiment)}_(s\d+\.pth|e\d+\.pth|latest\.json)\.\w+\.tmp$")
    stale = [p for p in checkpoint_dir.glob(".*.tmp") if ours.match(p.name)] if checkpoint_dir.is_dir() else []
    stale += list(log_dir.glob(".*.tmp")) if log_dir.is_dir() else []
    for path in stale:
        if path.is_file():
            path.unlink(missing_ok=True)
    return stale


class StepLog:
    """metrics.jsonl: one line per optimizer step, flushed as written. Opened for a resumed run,
    it first drops the lines past the step resumed from (a killed run may have logged further,
    and its last line may be cut off), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if resume_step is None else _entries_up_to(path, resume_step)
        write_atomic(path, "".join(json.dumps(entry) + "\n" for entry in kept).encode())
        self._file: TextIO = path.open("a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_step_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl (a cut-off last line is skipped)."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def _entries_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [entry for entry in read_step_log(path) if entry.get("step", 0) <= step]
