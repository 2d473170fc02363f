"""Running completions off the event loop: one worker thread owns the model.

A single-thread executor serialises access to the model (on a CPU, two generations at once
only slow each other down) and keeps the event loop free to answer other requests. Events
travel from the worker to the request's coroutine through an asyncio queue; a request that
goes away (app.py notices) sets its job's `cancelled` flag, and the worker stops at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.generation import Piece, SampleEnd, sample_events
from gptlab.models import GPT
from gptlab.serve.schemas import ApiError
from gptlab.tokenizers.base import Tokenizer

log = logging.getLogger("gptlab.serve")


@dataclass(frozen=True)
class Failed:
    """The generation did not complete: 400 for a GptlabError (the request's fault), 503 when
    the server shut down meanwhile, 500 for a bug."""

    status: int
    message: str


_END = object()  # the last event of every job


class Job:
    """One request's completions: the worker emits events, the request's coroutine reads them."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.cancelled = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: object) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    async def events(self) -> AsyncIterator[Piece | SampleEnd | Failed]:
        """The job's events until it ends; leaving early (a client hung up) cancels the job."""
        try:
            while (event := await self._queue.get()) is not _END:
                yield event
        finally:
            self.cancelled.set()


class ModelRunner:
    """Admits at most `capacity` requests at once (queued or generating) and runs their
    completions one after the other on a worker thread."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, capacity: int):
        self.model, self.tokenizer, self.capacity = model, tokenizer, capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptlab-model")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()  # admitted and not finished: queued or generating
        self._closing = False

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def reserve(self) -> Job:
        """A slot for one request, held until its job ends (or `release`); ApiError 429 when
        `capacity` requests are already in flight. Taken before the prompts are encoded, so that
        at most `capacity` requests encode at once. Must be called on the event loop that will
        read the job's events."""
        job = Job(asyncio.get_running_loop())
        with self._lock:
            if len(self._jobs) >= self.capacity:
                raise ApiError(
                    429,
                    f"the server is busy: {len(self._jobs)} requests in flight, the most it takes "
                    "(--max_concurrent); retry later",
                    kind="rate_limit_error",
                )
            self._jobs.add(job)
        return job

    def start(
        self, job: Job, prompt_ids: Sequence[Sequence[int]], cfg: SampleConfig, end_ids: Collection[int] = ()
    ) -> None:
        """Queue the completions of a reserved job, each ending at <EOS> or one of `end_ids`;
        ApiError 503 (and the slot freed) when shutting down."""
        try:
            self._executor.submit(self._run, job, prompt_ids, cfg, end_ids)
        except RuntimeError:  # the executor is shut down
            self.release(job)
            raise ApiError(503, "the server is shutting down; retry on a running server", kind="server_error") from None

    def submit(self, prompt_ids: Sequence[Sequence[int]], cfg: SampleConfig) -> Job:
        """reserve() and start() in one."""
        job = self.reserve()
        self.start(job, prompt_ids, cfg)
        return job

    def release(self, job: Job) -> None:
        """Free the slot of a job that will not run (or has ended)."""
        with self._lock:
            self._jobs.discard(job)

    def shutdown(self) -> None:
        """Cancel every job (each then ends at once; a client still connected gets a 503) and stop
        the worker. Under `gptlab serve`, uvicorn has by then closed the connections it gave up
        waiting for (5 s, timeout_graceful_shutdown), so those clients see their answer cut short."""
        with self._lock:
            self._closing = True
            for job in self._jobs:
                job.cancelled.set()
        self._executor.shutdown(wait=True)

    def _run(self, job: Job, prompt_ids: Sequence[Sequence[int]], cfg: SampleConfig, end_ids: Collection[int]) -> None:
        try:
            if not job.cancelled.is_set():  # skip a job whose client left while it was queued
                events = sample_events(self.model, self.tokenizer, prompt_ids, cfg, job.cancelled.is_set, end_ids)
                for event in events:
                    job.emit(event)
            if self._closing:
                job.emit(Failed(503, "the server shut down before this answer was complete; retry on a running server"))
        except GptlabError as err:
            job.emit(Failed(400, str(err)))
        except Exception:
            log.exception("generation failed")
            job.emit(Failed(500, "generation failed on the server; its log has the traceback"))
        finally:
            self.release(job)  # before _END: a client that read the whole answer may send the next request at once
            job.emit(_END)
