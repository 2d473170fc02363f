"""The loss or bits-per-byte curves of training runs, read from their TensorBoard logs and drawn to
an image, so runs can be compared without starting TensorBoard (`gptlab plot`: cli/plot.py)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.files import write_atomic

METRICS = ("val/bpb", "val/loss", "train/loss")  # the usual ones; any logged scalar works
X_AXES = ("step", "time")
_EVENTS_GLOB = "events.out.tfevents.*"
_AXIS_LABELS = {
    "step": "optimizer step",
    "time": "wall-clock seconds since the run's first log",
    "val/bpb": "validation bits per byte",
    "val/loss": "validation loss (nats/token)",
    "train/loss": "training loss (nats/token)",
}


@dataclass(frozen=True)
class Curve:
    """One scalar of one run: x (steps, or seconds since the run's first logged scalar) and y."""

    label: str
    metric: str
    xs: list[float]
    ys: list[float]


def read_scalars(run_dir: str | Path):
    """The TensorBoard EventAccumulator of `run_dir` with every scalar loaded."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"run directory {run_dir} not found; pass a run directory such as runs/<experiment_name>")
    if not any(run_dir.glob(_EVENTS_GLOB)):
        runs = sorted(str(p.parent) for p in run_dir.glob(f"*/{_EVENTS_GLOB}"))
        hint = f"it holds the runs {', '.join(dict.fromkeys(runs))}" if runs else "train into it first"
        raise GptlabError(f"{run_dir} holds no TensorBoard event files; {hint}")
    accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})  # 0: keep every point
    accumulator.Reload()
    return accumulator


def read_curve(run_dir: str | Path, metric: str = "val/bpb", x: str = "step", label: str | None = None) -> Curve:
    """The curve of `metric` in the run logged under `run_dir`, against steps or seconds.

    Seconds count from the earliest scalar the run logged, so evaluation pauses are included.
    """
    if x not in X_AXES:
        raise GptlabError(f"unknown x axis {x!r}; use one of {', '.join(X_AXES)}")
    accumulator = read_scalars(run_dir)
    tags = sorted(accumulator.Tags()["scalars"])
    if metric not in tags:
        raise GptlabError(f"{run_dir} logged no {metric!r}; its metrics are {', '.join(tags) or 'none yet'}")
    events = accumulator.Scalars(metric)
    if x == "step":
        xs = [float(e.step) for e in events]
    else:
        start = min(e.wall_time for tag in tags for e in accumulator.Scalars(tag))
        xs = [e.wall_time - start for e in events]
    return Curve(label=label or Path(run_dir).name, metric=metric, xs=xs, ys=[e.value for e in events])


def draw_curves(curves: Sequence[Curve], x: str = "step", title: str | None = None):
    """A matplotlib Figure with one line per curve (a marker at each point, for short runs)."""
    # A bare Figure, not pyplot: no window, no global state, whatever backend the caller uses.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), layout="constrained")
    axes = figure.add_subplot()
    for curve in curves:
        axes.plot(curve.xs, curve.ys, marker="." if len(curve.xs) < 50 else None, label=curve.label)
    metric = curves[0].metric if curves else ""
    axes.set_xlabel(_AXIS_LABELS[x])
    axes.set_ylabel(_AXIS_LABELS.get(metric, metric))
    axes.set_title(title or f"{metric} against {x}")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    return figure


def plot_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    metric: str = "val/bpb",
    x: str = "step",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> list[Curve]:
    """Draw `metric` of every run in `run_dirs` into the image `out` (PNG, SVG, PDF: by its suffix).

    Labels default to the run directories' names (their paths when names repeat). The image is
    written atomically; the curves drawn are returned.
    """
    if not run_dirs:
        raise GptlabError("no runs to plot; pass one or more run directories such as runs/<experiment_name>")
    if labels is not None and len(labels) != len(run_dirs):
        raise GptlabError(f"{len(labels)} labels for {len(run_dirs)} runs; pass one label per run")
    out = Path(out)
    image_format = _image_format(out)
    if labels is None:
        names = [Path(d).name for d in run_dirs]
        labels = names if len(set(names)) == len(names) else [str(d) for d in run_dirs]
    curves = [read_curve(d, metric, x, label) for d, label in zip(run_dirs, labels)]
    figure = draw_curves(curves, x, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=image_format, dpi=120)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buffer.getvalue())
    return curves


def _image_format(out: Path) -> str:
    supported = ("png", "svg", "pdf")
    image_format = out.suffix.lower().lstrip(".")
    if image_format not in supported:
        raise GptlabError(f"cannot tell the image format of {out}; end it in {', '.join('.' + s for s in supported)}")
    return image_format
