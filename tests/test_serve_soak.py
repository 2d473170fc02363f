"""The server soak of benchmarks/serve_soak.py: many clients at once, valid, broken and hostile
(oversized, malformed and slow bodies, hang-ups mid-stream), against `gptlab serve` on 127.0.0.1.
A few seconds by default; the 60 s, 64-client form of BENCHMARKS.md with -m slow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="gptlab serve needs the [serve] extra (fastapi, uvicorn)")
if not Path("/proc/self/status").exists():
    pytest.skip("the soak reads the server's memory from /proc (Linux)", allow_module_level=True)

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("serve_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_soak"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["serve_soak"]


def check(soak, report) -> None:
    """Every check of the soak passed, and every kind of request was tried."""
    assert report.failures == [], report.markdown() + "\n" + "\n".join(report.bad[:10])
    untried = [kind for kind in soak.KINDS if not sum(report.answers[kind].values())]
    assert untried == [], report.markdown()


def test_short_soak(soak):
    # The soak drives its 16 clients from this same process on the same 2 cores as the server, so
    # a /health answer can wait for the scheduler; measured here up to 0.9 s. 2 s still catches an
    # event loop blocked by a request (test_serve_guard.py checks /health during one too), without
    # failing the default suite on scheduling noise. The 60 s soak keeps the 1 s bound.
    check(soak, soak.run_soak(clients=16, seconds=4, health_limit_s=2.0))


@pytest.mark.slow
def test_soak_64_clients_for_60_s(soak):
    check(soak, soak.run_soak(clients=64, seconds=60))
