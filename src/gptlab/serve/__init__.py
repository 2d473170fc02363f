"""Serving a trained GPT: an HTTP API with a browser playground (`gptlab serve`) and a prompt
loop in the terminal (`gptlab generate --interactive`).

    from gptlab.serve.app import create_app        # needs the [serve] extra: fastapi, uvicorn
    app = create_app(model, tokenizer, ServeLimits(max_concurrent=2))

This package imports without fastapi; only app.py needs it.
"""

from gptlab.serve.cli_commands import add_serve_parser, run_interactive
from gptlab.serve.schemas import ServeLimits

__all__ = ["ServeLimits", "add_serve_parser", "run_interactive"]
