"""Long model work as chunks that the model worker runs one at a time: jobs, and synchronous runs.

Work is a generator (`Steps`). Each `next()` runs one chunk on the model worker and yields the
progress so far (a float in [0, 1], or a dict with `progress` and any other fields to show, such
as a training stage and loss); its `return` value is the JSON-ready result. After each chunk the
next one is queued behind the requests already waiting, so interactive requests (another user's
`/attention`, a hover in the viewer) are answered between chunks instead of after the sweep.

`"async": true` requests become jobs in the `JobManager` (202 with the job's id; `GET /jobs/{id}`
polls, `DELETE /jobs/{id}` cancels); at most `MAX_RUNNING_JOBS` run at once, at most `MAX_JOBS`
are kept, and a finished one is forgotten `JOB_TTL_SECONDS` after it ended. A synchronous
request runs the same chunks through `run_sync`, outside the manager (it holds no job slot): it
stops between chunks when its client is gone.
"""
from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any, Callable, Generator, Iterator, TypeVar

from ..errors import Cancelled, InvalidRequest, Overloaded
from .engine import ModelWorker

log = logging.getLogger("explorer")

MAX_JOBS = 32  # kept at once, running or finished; a new one past this evicts the oldest finished
MAX_RUNNING_JOBS = 8  # unfinished at once; more get 503 (each holds its runs while it waits)
JOB_TTL_SECONDS = 600  # a finished job's result stays readable this long
POLL_SECONDS = 0.25  # how often a synchronous run looks at its client between chunks

Steps = Generator[Any, None, Any]
T = TypeVar("T")

# What the chunk running on this thread asks to know whether its work was cancelled meanwhile (None:
# the work is not cancellable, e.g. an interactive request's pass). See `stop_if_cancelled`.
_chunk = threading.local()


def stop_if_cancelled() -> None:
    """Raise `Cancelled` when the job whose chunk runs on this thread was cancelled meanwhile. Long
    single passes call it between blocks (`math.forward.run_until`, the replays), so a DELETE or a
    client that left stops the work within one block instead of waiting for the pass to end."""
    cancelled = getattr(_chunk, "cancelled", None)
    if cancelled is not None and cancelled():
        raise Cancelled()


def interruptible() -> bool:
    """Whether the work on this thread is a cancellable chunk (so passes should check between blocks)."""
    return getattr(_chunk, "cancelled", None) is not None


class Job:
    """One unit of long work and what `GET /jobs/{id}` reports about it."""

    def __init__(self, kind: str, steps: Steps, worker: ModelWorker,
                 listener: Callable[[Any], None] | None = None) -> None:
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
        self._listener = listener  # told every update, on the worker thread (a stream's queue)
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Queue the first chunk; `Overloaded` when the model queue is full."""
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
        _chunk.cancelled = self._cancel.is_set
        try:
            update = next(self._steps)
            if isinstance(update, dict):
                self.progress = float(update.get("progress", self.progress))
                self.detail = {k: v for k, v in update.items() if k != "progress"}
            else:
                self.progress = float(update)
        except StopIteration as stop:
            self.progress = 1.0
            self._finish("done", result=stop.value)
            return
        except Cancelled:  # stopped inside the chunk (`stop_if_cancelled`)
            self._finish("cancelled", error="cancelled")
            return
        except InvalidRequest as exc:
            self._finish("error", error=str(exc))
            return
        except Exception:  # a failed chunk, or an update that is no progress: the job ends, never hangs
            log.exception("job %s (%s) failed", self.id, self.kind)
            self._finish("error", error="internal error (details are in the server log)")
            return
        finally:
            _chunk.cancelled = None
        if self._listener is not None:
            self._listener({"progress": round(self.progress, 4), **self.detail})
        self._worker.submit(self._step, bounded=False)

    def _finish(self, status: str, result: Any = None, error: str | None = None) -> None:
        with self._lock:
            self.status, self.result, self.error = status, result, error
            self.ended = time.time()
        self._steps.close()  # on the worker thread: releases whatever the generator holds
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


def run_sync(kind: str, steps: Steps, worker: ModelWorker, gone: Callable[[], bool] = lambda: False) -> Any:
    """Run `steps` chunk by chunk on `worker` and return the result (a synchronous request).

    Its first chunk is admitted like any request (`Overloaded` when the queue is full); it takes no
    job slot. `gone()` is asked between chunks: once it is true (the client disconnected) the work
    stops before its next chunk and `Cancelled` is raised.
    """
    job = Job(kind, steps, worker)
    job.start()
    while True:
        try:
            return job.done.result(timeout=POLL_SECONDS)
        except TimeoutError:
            if gone():
                job.cancel()


class _Abort(BaseException):
    """Raised inside a function run `in_turns` when its steps were closed (not an `Exception`, so
    the function's own error handling does not swallow it)."""


def in_turns(fn: Callable[[Callable[[], None]], T]) -> Generator[None, None, T]:
    """Steps that run a blocking function in chunks: `fn(pause)` runs on a thread of its own, in
    strict turns with the caller. Each `next()` lets it run until it calls `pause()` (the chunk
    ends: `next()` returns) or returns (its value is the steps' result); the caller's thread waits
    meanwhile, so the two never use the model at once. For a library loop that only offers a
    callback (a fit's backward passes), this makes each iteration one chunk of worker time.

    Closing the steps (a cancelled job) makes the paused `pause()` raise, and waits until `fn` has
    unwound (its `finally` blocks and context managers ran); `fn`'s own exceptions are raised by
    `next()`. The thread starts on the first `next()`, so steps never started leave nothing behind.
    """
    go, back = threading.Semaphore(0), threading.Semaphore(0)
    abort = threading.Event()
    outcome: dict[str, Any] = {}

    def pause() -> None:
        back.release()
        go.acquire()
        if abort.is_set():
            raise _Abort()

    def run() -> None:
        go.acquire()
        try:
            if not abort.is_set():
                outcome["value"] = fn(pause)
        except _Abort:
            pass
        except BaseException as exc:  # raised again by the caller's next()
            outcome["error"] = exc
        finally:
            outcome["ended"] = True
            back.release()

    thread = threading.Thread(target=run, name="turns", daemon=True)
    thread.start()
    try:
        while True:
            go.release()
            back.acquire()
            if "ended" in outcome:
                break
            yield
    finally:
        if "ended" not in outcome:  # closed while `fn` is paused: unwind it
            abort.set()
            go.release()
            back.acquire()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def stamped(steps: Steps, stamp: Callable[[], dict[str, Any]]) -> Steps:
    """`steps` whose result carries a `provenance` (`stamp()`, called once the result is done)."""
    result = yield from steps
    return {**result, "provenance": stamp()}


class Stream:
    """A synchronous request whose updates are sent as they happen (server-sent events): the
    first chunk is queued at once (`Overloaded` when the queue is full, before any byte is sent);
    `events()` yields ("progress", update) per chunk, then ("result", result) or ("error",
    message). Closing it, or `gone()` turning true, cancels the work before its next chunk."""

    def __init__(self, kind: str, steps: Steps, worker: ModelWorker, gone: Callable[[], bool] = lambda: False) -> None:
        self._updates: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._gone = gone
        self.job = Job(kind, steps, worker, listener=self._updates.put)
        self.job.start()

    def events(self) -> Iterator[tuple[str, Any]]:
        try:
            while True:
                try:
                    yield "progress", self._updates.get(timeout=POLL_SECONDS)
                    continue
                except queue.Empty:
                    pass
                if self.job.done.done() and self._updates.empty():
                    break
                if self._gone():
                    self.job.cancel()
            error = self.job.done.exception()
            if error is None:
                yield "result", self.job.done.result()
            elif isinstance(error, InvalidRequest):
                yield "error", str(error)
            elif not isinstance(error, Cancelled):
                yield "error", "internal error (details are in the server log)"
        finally:
            self.job.cancel()  # the client left mid-stream: stop before the next chunk


class JobManager:
    """The jobs of one server (all models): bounded in number, forgotten after a while."""

    def __init__(self, max_jobs: int = MAX_JOBS, max_running: int = MAX_RUNNING_JOBS,
                 ttl_seconds: float = JOB_TTL_SECONDS) -> None:
        self.max_jobs = max_jobs
        self.max_running = max_running
        self.ttl_seconds = ttl_seconds
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, kind: str, steps: Steps, worker: ModelWorker) -> Job:
        """Register and queue a job; `Overloaded` (503) when too many are unfinished."""
        job = Job(kind, steps, worker)
        with self._lock:
            self._expire()
            running = sum(j.ended is None for j in self._jobs.values())
            if running >= self.max_running:
                raise Overloaded(f"{running} jobs are already running (at most {self.max_running}); "
                                 "wait for one to finish or cancel one", retry_after=5)
            job.start()  # before registering: a job refused by a full queue holds no slot
            while len(self._jobs) >= self.max_jobs:
                oldest = next((k for k, j in self._jobs.items() if j.ended is not None))
                del self._jobs[oldest]
            self._jobs[job.id] = job
        return job

    def run(self, kind: str, steps: Steps, worker: ModelWorker) -> Any:
        """Run a job to its end and return its result (notebooks: progress readable meanwhile)."""
        return self.start(kind, steps, worker).done.result()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self._expire()
            return self._jobs.get(job_id)

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, j in self._jobs.items() if j.ended is not None and now - j.ended > self.ttl_seconds]:
            del self._jobs[key]
