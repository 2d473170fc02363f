"""Server soak: many clients at once against `gptlab serve`, well-behaved and not.

    python benchmarks/serve_soak.py [--clients 64] [--seconds 60] [--seed 0]

Builds a tiny GPT (random weights, the toy tokenizer of toy_data/tiny_sp) in a temporary
directory and starts `gptlab serve` on it, on a free port of 127.0.0.1, with --body_timeout 2.
Then --clients clients send requests back to back for --seconds, each request one of:
  whole      a valid completion, answered whole                      200 (429 when busy)
  stream     a valid completion, streamed and read to `data: [DONE]`  200 (429 when busy)
  hangup     a streamed completion whose client leaves after a chunk  200 (429 when busy)
  oversized  a body over --max_body_bytes: by Content-Length, or chunked and endless   413
             (408 if sending it outlasts --body_timeout)
  malformed  bad JSON, bad UTF-8, JSON nested 100,000 deep, 20,000 unknown fields, a prompt
             longer in bytes than the model could read, 1 MiB of empty lists        400/422
  slow       a body that stops half-way                                               408
Meanwhile a thread asks GET /health every 0.1 s and another samples the server's RSS.

It checks that the server never dies, that every answer has a status the request's kind
allows and is well-formed (an error is exactly OpenAI's error object; a stream is server-sent
events ending in [DONE]), that /health always answers within 1 s, that the peak RSS stays
under the idle RSS + 300 MB, that the in-flight count returns to 0, and that the server's log
holds no traceback. It prints a Markdown table of the figures and exits 1 if a check failed.
Linux only (RSS from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.models import GPT
from gptlab.serve.prompts import max_bytes_per_token
from gptlab.tokenizers import load_tokenizer
from gptlab.training import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"whole": 3, "stream": 3, "hangup": 2, "oversized": 1, "malformed": 2, "slow": 1}  # kind -> weight
EXPECTED = {
    # An oversized body may also be too slow: on a starved machine, sending 1 MiB can outlast --body_timeout.
    "whole": {200, 429}, "stream": {200, 429}, "hangup": {200, 429}, "oversized": {413, 408}, "malformed": {400, 422},
    "slow": {408},
}  # fmt: skip
BODY_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 2**20  # the server's default
RSS_HEADROOM_MB = 300
HEALTH_LIMIT_S = 1.0
REQUEST_TIMEOUT_S = 60.0
SEQ_LEN = 64


@dataclass
class Report:
    clients: int
    seconds: float
    answers: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # kind -> status -> count
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # of the 200s
    bad: list[str] = field(default_factory=list)  # what was wrong with an answer, one line each
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    health: list[float] = field(default_factory=list)  # seconds each /health took (inf: no answer)
    settle_s: float | None = None  # from the end of the load until in_flight was 0 (None: never)
    server_alive: bool = True
    tracebacks: int = 0
    health_limit_s: float = HEALTH_LIMIT_S

    @property
    def requests(self) -> int:
        return sum(sum(statuses.values()) for statuses in self.answers.values())

    @property
    def failures(self) -> list[str]:
        failed = [f"{len(self.bad)} bad answers, e.g. {self.bad[0]}"] if self.bad else []
        if not self.server_alive:
            failed.append("the server died")
        if self.tracebacks:
            failed.append(f"the server logged {self.tracebacks} traceback(s)")
        if not self.health or max(self.health) > self.health_limit_s:
            failed.append(
                f"/health took up to {max(self.health, default=float('inf')):.2f} s (limit {self.health_limit_s} s)"
            )
        if self.peak_rss_mb > self.idle_rss_mb + RSS_HEADROOM_MB:
            failed.append(f"peak RSS {self.peak_rss_mb:.0f} MB over idle {self.idle_rss_mb:.0f} + {RSS_HEADROOM_MB} MB")
        if self.settle_s is None:
            failed.append("the in-flight count never returned to 0")
        if not self.answers["whole"][200] or not self.answers["stream"][200]:
            failed.append("no valid request was answered 200")
        return failed

    def markdown(self) -> str:
        rows = ["| kind | requests | answers | p50 (s) | p99 (s) |", "|---|---:|---|---:|---:|"]
        for kind in KINDS:
            statuses = self.answers[kind]
            shown = ", ".join(f"{status}: {n:,}" for status, n in sorted(statuses.items()))
            lat = sorted(self.latencies[kind])
            p50, p99 = (f"{percentile(lat, 50):.3f}", f"{percentile(lat, 99):.3f}") if lat else ("", "")
            rows.append(f"| {kind} | {sum(statuses.values()):,} | {shown} | {p50} | {p99} |")
        health = sorted(self.health)
        settle = "never" if self.settle_s is None else f"{self.settle_s:.2f} s"
        rows += [
            "",
            f"- {self.requests:,} requests from {self.clients} clients in {self.seconds:g} s; "
            f"bad answers: {len(self.bad)}; server alive: {'yes' if self.server_alive else 'NO'}; "
            f"tracebacks in its log: {self.tracebacks}",
            f"- RSS: idle {self.idle_rss_mb:.0f} MB, peak {self.peak_rss_mb:.0f} MB "
            f"(+{self.peak_rss_mb - self.idle_rss_mb:.0f} MB; bound +{RSS_HEADROOM_MB} MB)",
            f"- /health: {len(health):,} probes, p50 {percentile(health, 50) * 1000:.0f} ms, "
            f"p99 {percentile(health, 99) * 1000:.0f} ms, max {health[-1] * 1000:.0f} ms (bound {self.health_limit_s * 1000:.0f} ms)"
            if health else "- /health: no probe answered",
            f"- in flight back to 0: {settle} after the load stopped",
        ]  # fmt: skip
        return "\n".join(rows)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


# ---- the server --------------------------------------------------------------------------------


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny random GPT with the toy tokenizer, saved as `gptlab train` saves one."""
    tokenizer = load_tokenizer(None, ROOT / "toy_data" / "tiny_sp")
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=32, n_heads=4, num_layers=2, seq_len=SEQ_LEN, tgt_vocab_size=tokenizer.vocab_size)
    model = GPT(config).eval()
    path = directory / "soak.pth"
    save_checkpoint(path, model, tokenizer, config, DatasetConfig(), TrainConfig(), step=0, epoch=0)
    return path


class Server:
    """`gptlab serve` in a subprocess on a free port of 127.0.0.1; its output kept in `log`."""

    def __init__(self, checkpoint: Path):
        command = [
            sys.executable, "-m", "gptlab", "serve", "--model_path", str(checkpoint), "--port", "0", "--device", "cpu",
            "--body_timeout", str(BODY_TIMEOUT_S), "--max_body_bytes", str(MAX_BODY_BYTES),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: thread hand-offs cost more than they save
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("serving"):
                break
        else:
            raise RuntimeError("gptlab serve did not start:\n" + "".join(self.lines))
        self.port = int(line.split(" at ")[1].split()[0].rstrip("/").rsplit(":", 1)[1])
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def rss_mb(self) -> float:
        return proc_status_kb(self.process.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return proc_status_kb(self.process.pid, "VmHWM") / 1024

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


# ---- the clients -------------------------------------------------------------------------------


class Answer:
    """An HTTP response as read off the socket: status, headers, and the body's bytes."""

    def __init__(self, status: int, headers: dict[str, str]):
        self.status, self.headers, self.body = status, headers, b""


class Connection:
    """A raw TCP connection to the server. Raw, so that a client may stop sending half-way, and
    may still read the answer after the server closed its side (a failed send leaves what
    arrived before readable, where asyncio's streams would drop it)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    @classmethod
    async def open(cls, port: int) -> Connection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes) -> bool:
        """Whether the server took it all (False once it has closed the connection)."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
            return True
        except OSError:
            return False

    async def _more(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionError(f"the server closed the connection mid-answer after {self.buffer[:80]!r}")
        self.buffer += data

    async def read_until(self, separator: bytes) -> bytes:
        while separator not in self.buffer:
            await self._more()
        data, _, self.buffer = self.buffer.partition(separator)
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def read_answer(self, first_chunk_only: bool = False) -> Answer:
        """The answer's head, then its body by Content-Length, or chunk by chunk (all of them,
        or the first one only)."""
        status_line, *lines = (await self.read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        answer = Answer(int(status_line.split()[1]), headers)
        if "content-length" in headers:
            answer.body = await self.read_exactly(int(headers["content-length"]))
            return answer
        while True:
            size = int(await self.read_until(b"\r\n"), 16)
            answer.body += (await self.read_exactly(size + 2))[:-2]
            if size == 0 or first_chunk_only:
                return answer

    def close(self) -> None:
        self.sock.close()


def error_problem(answer: Answer) -> str | None:
    """What is wrong with an error answer, or None when it is exactly OpenAI's error object."""
    try:
        body = json.loads(answer.body)
    except ValueError:
        return f"{answer.status} with a body that is not JSON: {answer.body[:80]!r}"
    if not (isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], dict)):
        return f"{answer.status} without OpenAI's error object: {answer.body[:80]!r}"
    if set(body["error"]) != {"message", "type", "param", "code"} or not body["error"]["message"]:
        return f"{answer.status} with error fields {sorted(body['error'])}"
    return None


def stream_problem(answer: Answer, whole: bool) -> str | None:
    """What is wrong with a streamed answer, or None when it is server-sent events (ending in [DONE] if whole)."""
    if not answer.headers.get("content-type", "").startswith("text/event-stream"):
        return f"a stream with content-type {answer.headers.get('content-type')!r}"
    events = answer.body.decode().split("\n\n")
    if events[-1] != "" or not all(event.startswith("data: ") for event in events[:-1]):
        return f"a stream not framed as server-sent events: {answer.body[:80]!r}"
    payloads = [event.removeprefix("data: ") for event in events[:-1]]
    if whole and payloads[-1:] != ["[DONE]"]:
        return "a stream that does not end with data: [DONE]"
    for payload in payloads:
        if payload != "[DONE]" and not ("choices" in json.loads(payload) or "error" in json.loads(payload)):
            return f"a stream event without choices or error: {payload[:80]}"
    return None


class Client:
    """One client's requests, back to back until the deadline."""

    def __init__(self, port: int, rng: random.Random, report: Report, malformed_bodies: list[bytes]):
        self.port, self.rng, self.report, self.malformed_bodies = port, rng, report, malformed_bodies
        self.host = f"127.0.0.1:{port}"

    async def run(self, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            started = time.monotonic()
            try:
                answer, problem = await asyncio.wait_for(getattr(self, kind)(), REQUEST_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError, ValueError) as err:
                self.report.answers[kind]["no answer"] += 1
                self.report.bad.append(f"{kind}: {type(err).__name__}: {err}")
                continue
            self.report.answers[kind][answer.status] += 1
            if answer.status == 429:  # busy: back off a little, as a client should
                await asyncio.sleep(self.rng.uniform(0, 0.2))
            if answer.status not in EXPECTED[kind]:
                problem = f"status {answer.status}, expected {sorted(EXPECTED[kind])}: {answer.body[:120]!r}"
            elif answer.status >= 400:
                problem = error_problem(answer)
            elif kind != "hangup":
                self.report.latencies[kind].append(time.monotonic() - started)
            if problem:
                self.report.bad.append(f"{kind}: {problem}")

    async def exchange(self, head: str, *body_parts: bytes, first_chunk_only: bool = False) -> Answer:
        """Send the head and the body's parts (as long as the server takes them), then read the answer."""
        connection = await Connection.open(self.port)
        try:
            for part in (head.encode(), *body_parts):
                if not await connection.send(part):
                    break
            return await connection.read_answer(first_chunk_only)
        finally:
            connection.close()  # a hang-up, for a stream still going

    def post(self, body: bytes, content_type: str = "application/json", extra: str = "") -> str:
        return (
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
        )

    def completion(self, stream: bool) -> bytes:
        prompt = self.rng.choice(["Once upon a time", "The cat", "", "日本語 🎉 text"])
        return json.dumps({"prompt": prompt, "max_tokens": self.rng.randint(1, 24), "stream": stream}).encode()

    async def whole(self) -> tuple[Answer, str | None]:
        body = self.completion(stream=False)
        answer = await self.exchange(self.post(body), body)
        if answer.status == 200 and "choices" not in json.loads(answer.body):
            return answer, f"a completion without choices: {answer.body[:80]!r}"
        return answer, None

    async def stream(self) -> tuple[Answer, str | None]:
        body = self.completion(stream=True)
        answer = await self.exchange(self.post(body), body)
        return answer, stream_problem(answer, whole=True) if answer.status == 200 else None

    async def hangup(self) -> tuple[Answer, str | None]:
        body = self.completion(stream=True)
        answer = await self.exchange(self.post(body), body, first_chunk_only=True)
        return answer, stream_problem(answer, whole=False) if answer.status == 200 else None

    async def oversized(self) -> tuple[Answer, str | None]:
        if self.rng.random() < 0.5:  # declared: refused from the Content-Length, after a first piece of the body
            size = self.rng.randint(MAX_BODY_BYTES + 1, 10 * MAX_BODY_BYTES)
            head = self.post(b"").replace("Content-Length: 0", f"Content-Length: {size}")
            return await self.exchange(head, b" " * 65536), None
        # Chunked with no end: refused once past the limit, whatever comes after.
        head = self.post(b"").replace("Content-Length: 0", "Transfer-Encoding: chunked")
        chunk = b"10000\r\n" + b" " * 65536 + b"\r\n"
        return await self.exchange(head, *[chunk] * (MAX_BODY_BYTES // 65536 + 2)), None

    async def malformed(self) -> tuple[Answer, str | None]:
        body = self.rng.choice(self.malformed_bodies)
        return await self.exchange(self.post(body), body), None

    async def slow(self) -> tuple[Answer, str | None]:
        body = self.completion(stream=False)
        return await self.exchange(self.post(body), body[: len(body) // 2]), None  # the rest never comes


# ---- the soak ----------------------------------------------------------------------------------


def malformed_bodies(tokenizer) -> list[bytes]:
    """Bodies that must get a 400 or 422, made once."""
    return [
        b'{"prompt": "Once", "max_tokens": }', b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000,
        json.dumps({f"field_{i}": 0 for i in range(20_000)}).encode(),
        json.dumps({"prompt": "a" * (SEQ_LEN * max_bytes_per_token(tokenizer) + 1)}).encode(),  # over SEQ_LEN tokens
        b"[" + b"[]," * (MAX_BODY_BYTES // 3 - 1) + b"[]]",  # the body that parses slowest
    ]  # fmt: skip


def probe_health(server: Server, report: Report, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            status, _ = server.get("/health", timeout=5)
            report.health.append(time.monotonic() - started if status == 200 else float("inf"))
        except OSError:
            report.health.append(float("inf"))
        stop.wait(0.1)


def sample_rss(server: Server, report: Report, stop: threading.Event) -> None:
    while not stop.is_set() and server.process.poll() is None:
        report.peak_rss_mb = max(report.peak_rss_mb, server.rss_mb())
        stop.wait(0.05)


def run_soak(clients: int = 64, seconds: float = 60.0, seed: int = 0, health_limit_s: float = HEALTH_LIMIT_S) -> Report:
    """Start a server, load it with `clients` clients for `seconds`, and report what happened."""
    report = Report(clients, seconds, health_limit_s=health_limit_s)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = tiny_checkpoint(Path(directory))
        malformed = malformed_bodies(load_tokenizer(None, ROOT / "toy_data" / "tiny_sp"))
        server = Server(checkpoint)
        try:
            warm = Client(server.port, random.Random(seed), Report(1, 0), malformed)
            for _ in range(3):  # the first answers allocate what every later one reuses
                asyncio.run(warm.whole())
            report.idle_rss_mb = report.peak_rss_mb = server.rss_mb()
            stop = threading.Event()
            watchers = [
                threading.Thread(target=probe_health, args=(server, report, stop), daemon=True),
                threading.Thread(target=sample_rss, args=(server, report, stop), daemon=True),
            ]  # fmt: skip
            for watcher in watchers:
                watcher.start()

            async def load() -> None:
                deadline = time.monotonic() + seconds
                rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
                await asyncio.gather(*(Client(server.port, rng, report, malformed).run(deadline) for rng in rngs))

            asyncio.run(load())
            report.settle_s = wait_until_idle(server, time.monotonic())
            stop.set()
            for watcher in watchers:
                watcher.join()
            report.server_alive = server.process.poll() is None
            if report.server_alive:
                report.peak_rss_mb = max(report.peak_rss_mb, server.peak_rss_mb())
        finally:
            server.stop()
        report.tracebacks = sum("Traceback" in line for line in server.lines)
    return report


def wait_until_idle(server: Server, since: float, within_s: float = 30.0) -> float | None:
    """Seconds from `since` until /health says nothing is in flight; None if that never happens."""
    while time.monotonic() < since + within_s:
        try:
            status, body = server.get("/health")
            if status == 200 and json.loads(body)["in_flight"] == 0:
                return time.monotonic() - since
        except OSError:
            return None
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long they send (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds each client's choices (default: %(default)s)")
    args = parser.parse_args(argv)
    report = run_soak(args.clients, args.seconds, args.seed)
    print(report.markdown())
    for failure in report.failures:
        print(f"FAILED: {failure}")
    for line in report.bad[:10]:
        print(f"  {line}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
