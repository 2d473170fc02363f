"""`gptlab plot`: the curves of training runs, read from their TensorBoard logs, drawn to an image."""

from __future__ import annotations

import argparse

from gptlab.plot import METRICS, X_AXES, plot_runs


def add_plot_parser(subparsers: argparse._SubParsersAction) -> None:
    """`gptlab plot RUN_DIR [RUN_DIR ...] --out plot.png [--metric M] [--x step|time]`."""
    parser = subparsers.add_parser(
        "plot",
        help="draw the loss or bits-per-byte curves of training runs to an image",
        description="Read the TensorBoard logs of one or several runs and draw one metric of each, "
        "one line per run, to a PNG (or .svg/.pdf).",
    )
    parser.add_argument("runs", nargs="+", help="run directories, e.g. runs/<experiment_name>")
    parser.add_argument("--out", required=True, help="image to write: .png, .svg or .pdf")
    parser.add_argument(
        "--metric",
        default="val/bpb",
        help=f"a logged scalar: {', '.join(METRICS)}, or lr, tokens_per_s, grad_norm ... (default: %(default)s)",
    )
    parser.add_argument("--x", default="step", choices=X_AXES, help="x axis: optimizer steps or wall-clock seconds")
    parser.add_argument("--title", help="title of the plot (default: the metric and axis)")
    parser.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> None:
    curves = plot_runs(args.runs, args.out, args.metric, args.x, title=args.title)
    last = ", ".join(f"{c.label} {c.ys[-1]:.4f}" for c in curves)
    print(f"wrote {args.out}: {args.metric} of {len(curves)} run(s) against {args.x} (last: {last})")
