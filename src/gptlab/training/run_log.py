"""Where a training run reports: console lines above a progress bar, TensorBoard scalars and the
per-step metrics.jsonl. Only the main process (rank 0) reports; on the others every call is a no-op."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gptlab.files import write_atomic
from gptlab.training.run_files import StepLog


class RunLog:
    """The run's outputs under <log_dir>/<experiment>/. A resumed run (resume_step set) drops what
    its first run logged after the checkpoint, in TensorBoard and in metrics.jsonl alike."""

    def __init__(
        self, log_dir: Path, active: bool, progress: bool, total_steps: int, step: int, resume_step: int | None
    ):
        self.active = active
        self.writer = self.step_log = None
        if active:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only a run needs it

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)
            self.step_log = StepLog(log_dir / "metrics.jsonl", resume_step)
        self.bar = tqdm(
            total=total_steps, initial=step, unit="step", disable=not (progress and active), dynamic_ncols=True
        )

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """TensorBoard scalars at `step` (None values are left out)."""
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)

    def step(self, entry: dict[str, Any], postfix: dict[str, Any]) -> None:
        """One optimizer step: a metrics.jsonl line and a tick of the progress bar."""
        if self.active:
            self.step_log.write(entry)
            self.bar.update(1)
            self.bar.set_postfix(postfix, refresh=False)

    def print(self, message: str) -> None:
        if self.active:
            tqdm.write(message)  # above the progress bar, not through it

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.step_log.close()

    def announce(self, summary: dict[str, Any], path: Path, notices: list[str]) -> None:
        """Print the run's resolved configuration `summary` and write it to `path` (JSON), then the notices."""
        text = json.dumps(summary, indent=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (text + "\n").encode())
        self.print(f"training configuration (also in {path}):\n{text}")
        for notice in notices:
            self.print(notice)
