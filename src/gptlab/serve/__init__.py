"""Serving a trained GPT: an HTTP API with a browser playground (`gptlab serve`, whose command
line is gptlab/cli/serve.py).

    from gptlab.serve.app import create_app        # needs the [serve] extra: fastapi, uvicorn
    app = create_app(model, tokenizer, ServeLimits(max_concurrent=2))

This package imports without fastapi; only app.py needs it.
"""

from gptlab.serve.schemas import ServeLimits

__all__ = ["ServeLimits"]
