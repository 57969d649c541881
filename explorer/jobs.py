"""Long model work (sweeps, training) as jobs: chunks that the model worker runs one at a time.

A job is a generator. Each `next()` runs one chunk on the model worker and yields the progress
so far (a float in [0, 1], or a dict with `progress` and any other fields to show, such as a
training stage and loss); its `return` value is the JSON-ready result. After each chunk the next
one is queued behind the requests already waiting, so interactive requests (another user's
`/attention`, a hover in the viewer) are answered between chunks instead of after the sweep.

The same path serves synchronous requests (the HTTP thread waits for the job) and `"async": true`
ones (202 with the job's id; `GET /jobs/{id}` polls, `DELETE /jobs/{id}` cancels). At most
`MAX_JOBS` jobs are kept; a finished job is forgotten `JOB_TTL_SECONDS` after it ended.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Generator, Iterator

from .analysis import InvalidRequest
from .engine import ModelWorker, Overloaded

log = logging.getLogger("explorer")

MAX_JOBS = 32  # kept at once, running or finished; a new one past this evicts the oldest finished
MAX_RUNNING_JOBS = 8  # unfinished at once; more get 503 (each holds its runs while it waits)
JOB_TTL_SECONDS = 600  # a finished job's result stays readable this long

JobSteps = Generator[Any, None, Any]


class Cancelled(Exception):
    """The job was cancelled (`DELETE /jobs/{id}`)."""


class Job:
    """One unit of long work and what `GET /jobs/{id}` reports about it."""

    def __init__(self, kind: str, steps: Iterator[Any], worker: ModelWorker) -> None:
        self.id = secrets.token_hex(8)
        self.kind = kind
        self.status = "queued"  # queued | running | cancelling | done | error | cancelled
        self.progress = 0.0
        self.detail: dict[str, Any] = {}
        self.result: Any = None
        self.error: str | None = None
        self.created = time.time()
        self.ended: float | None = None
        self.done: Future[Any] = Future()
        self._steps = steps
        self._worker = worker
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._worker.submit(self._step)

    def cancel(self) -> bool:
        """Stop before the next chunk. Returns False if the job had already ended."""
        with self._lock:
            if self.ended is not None:
                return False
            self._cancel.set()
            self.status = "cancelling"
        return True

    def _step(self) -> None:
        """Run one chunk (on the worker thread), then queue the next one or finish."""
        if self._cancel.is_set():
            self._finish("cancelled", error="cancelled")
            return
        if self.status == "queued":
            self.status = "running"
        try:
            update = next(self._steps)
        except StopIteration as stop:
            self.progress = 1.0
            self._finish("done", result=stop.value)
            return
        except InvalidRequest as exc:
            self._finish("error", error=str(exc))
            return
        except Exception:
            log.exception("job %s (%s) failed", self.id, self.kind)
            self._finish("error", error="internal error (details are in the server log)")
            return
        if isinstance(update, dict):
            self.progress = float(update.get("progress", self.progress))
            self.detail = {k: v for k, v in update.items() if k != "progress"}
        else:
            self.progress = float(update)
        self._worker.submit(self._step, bounded=False)

    def _finish(self, status: str, result: Any = None, error: str | None = None) -> None:
        with self._lock:
            self.status, self.result, self.error = status, result, error
            self.ended = time.time()
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()  # on the worker thread: releases whatever the generator holds
        if status == "done":
            self.done.set_result(result)
        elif status == "cancelled":
            self.done.set_exception(Cancelled())
        else:
            self.done.set_exception(InvalidRequest(error or "failed") if status == "error" else RuntimeError(error))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": self.id, "kind": self.kind, "status": self.status,
                               "progress": round(self.progress, 4), **self.detail}
        if self.status == "done":
            out["result"] = self.result
        if self.error is not None:
            out["error"] = self.error
        return out


class JobManager:
    """The jobs of one server (all models): bounded in number, forgotten after a while."""

    def __init__(self, max_jobs: int = MAX_JOBS, max_running: int = MAX_RUNNING_JOBS,
                 ttl_seconds: float = JOB_TTL_SECONDS) -> None:
        self.max_jobs = max_jobs
        self.max_running = max_running
        self.ttl_seconds = ttl_seconds
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, kind: str, steps: Iterator[Any], worker: ModelWorker) -> Job:
        """Register and queue a job; `Overloaded` (503) when too many are unfinished."""
        job = Job(kind, steps, worker)
        with self._lock:
            self._expire()
            running = sum(j.ended is None for j in self._jobs.values())
            if running >= self.max_running:
                raise Overloaded(f"{running} jobs are already running (at most {self.max_running}); "
                                 "wait for one to finish or cancel one", retry_after=5)
            while len(self._jobs) >= self.max_jobs:
                oldest = next((k for k, j in self._jobs.items() if j.ended is not None))
                del self._jobs[oldest]
            self._jobs[job.id] = job
        job.start()
        return job

    def run(self, kind: str, steps: Iterator[Any], worker: ModelWorker) -> Any:
        """Run a job to its end and return its result (a synchronous request)."""
        return self.start(kind, steps, worker).done.result()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, j in self._jobs.items() if j.ended is not None and now - j.ended > self.ttl_seconds]:
            del self._jobs[key]


def chunked(items: list[Any], size: int) -> Iterator[list[Any]]:
    """`items` in consecutive lists of at most `size`."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
