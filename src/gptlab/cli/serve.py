"""`gptlab serve`: the HTTP API and playground (the app itself is gptlab.serve)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from gptlab.cli.common import add_device_flag, add_weights_dtype_flag, load_for_generation
from gptlab.config import validated
from gptlab.errors import GptlabError
from gptlab.serve.schemas import ServeAccess, ServeLimits

API_KEY_VARIABLE = "GPTLAB_API_KEY"


# ---- gptlab serve ----------------------------------------------------------------------------
def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    """`gptlab serve --model_path X [--host H] [--port P] [--dtype D] [limits]`."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a GPT over HTTP: OpenAI-style completions API and a playground page",
        description=(
            "Load a checkpoint once and serve it: POST /v1/completions (OpenAI's completions request and "
            'response, streamed as server-sent events with "stream": true), GET /health, GET /v1/models, '
            "and a page at / to try prompts in a browser."
        ),
    )
    parser.add_argument(
        "--model_path",
        required=True,
        help="a .pth checkpoint written by gptlab train, or a directory written by gptlab export --format safetensors",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    add_device_flag(parser)
    add_weights_dtype_flag(parser)
    limits = parser.add_argument_group("limits on requests (beyond them a request gets a 4xx saying why)")
    for name, field in ServeLimits.model_fields.items():
        default = "" if field.default is None else f" (default: {field.default})"
        kind = float if field.annotation is float else int
        limits.add_argument(f"--{name}", type=kind, help=f"{field.description}{default}")
    access = parser.add_argument_group("who may use the server")
    access.add_argument(
        "--api_key",
        default=os.environ.get(API_KEY_VARIABLE) or None,
        help="require Authorization: Bearer KEY on every request but the page and /health (default: "
        f"${API_KEY_VARIABLE}, which keeps the key out of the process list; none: anyone who can connect may use it)",
    )
    access.add_argument(
        "--allowed_hosts",
        default="",
        help="comma-separated host names or addresses that requests may name in their Host header, besides localhost, "
        "127.0.0.1, ::1 and the --host address; * for any (a browser page on another site could then reach the "
        "server through DNS rebinding)",
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from gptlab.serve.app import create_app
    except ImportError as err:
        raise GptlabError(f"gptlab serve needs {err.name}; install it with: pip install 'gptlab[serve]'") from None

    given = {name: getattr(args, name) for name in ServeLimits.model_fields}
    limits = validated(ServeLimits, {name: value for name, value in given.items() if value is not None})
    if args.api_key is not None and not args.api_key.strip():
        raise GptlabError("--api_key is empty; pass a key (a long random string), or leave the flag out")
    if not 0 <= args.port <= 65535:
        raise GptlabError(f"--port {args.port} is not a TCP port; pass 0 to 65535 (0 picks a free one)")
    with listen(args.host, args.port) as listener:  # bound first: a taken port fails fast, before the slow load
        host, port = listener.getsockname()[:2]
        hosts = [name for name in args.allowed_hosts.split(",") if name.strip()]
        if not ipaddress.ip_address(host).is_unspecified:  # the address it listens on names it too
            hosts.append(host)
        access = validated(ServeAccess, {"api_key": args.api_key and args.api_key.strip(), "allowed_hosts": hosts})
        if warning := exposure_warning(host, access):
            print(warning, file=sys.stderr, flush=True)
        model, tokenizer = load_for_generation(args.model_path, args.device, args.dtype)
        model_name = Path(args.model_path).stem
        app = create_app(model, tokenizer, limits, model_name=model_name, access=access)
        shown_host = f"[{host}]" if ":" in host else host
        print(f"serving {model_name} at http://{shown_host}:{port}/ (API: /v1/completions; Ctrl-C stops)", flush=True)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[listener])


def exposure_warning(address: str, access: ServeAccess) -> str | None:
    """A warning when a server without an API key listens on an address other machines can reach."""
    if access.api_key is not None or ipaddress.ip_address(address).is_loopback:
        return None
    return (
        f"warning: listening on {address} without an API key: anyone who can reach this address can use the "
        f"model; pass --api_key or set {API_KEY_VARIABLE} (or listen on 127.0.0.1)"
    )


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port, or GptlabError saying why it cannot."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror:
        raise GptlabError(f"cannot resolve --host {host}; pass an address such as 127.0.0.1 or 0.0.0.0") from None
    except OSError as err:
        raise GptlabError(
            f"cannot listen on {host}:{port} ({err.strerror}); pass another --port, or stop the program using it"
        ) from None
