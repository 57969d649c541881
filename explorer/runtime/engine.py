"""Serialized model work, a byte-bounded LRU cache of forward passes, and single-flight.

The bridge is not thread-safe (hooks are shared state), so every use of the model runs on one
worker thread fed by a bounded queue; a full queue is refused at once (`Overloaded`) instead of
piling up waiting threads. Results are cached by key with LRU eviction under a byte bound, and
concurrent requests for the same key share one computation.
"""
from __future__ import annotations

import logging
import atexit
import ctypes
import sys
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable, Hashable, TypeVar

import torch

from ..errors import Overloaded

log = logging.getLogger("explorer")
T = TypeVar("T")

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB: a few 1024-token GPT-2-small texts, hundreds of short ones
DEFAULT_WORK_BYTES = 2 << 30  # one request's working memory beside the cache: sized for a laptop
DEFAULT_QUEUE_SIZE = 16
DEFAULT_WAIT_SECONDS = 120.0
# Starting guesses of the model's float32 throughput, until its own passes are measured.
CPU_FLOPS = 60e9
GPU_FLOPS = 20e12


class Throughput:
    """A model's measured throughput in floating-point operations per second: the operations
    of its last WINDOW measurements (forward passes and replayed blocks) over the seconds they
    took (long ones weigh more, and a slow machine reads slow). Chunk sizes and the time
    estimates of long requests read it."""

    WINDOW = 16

    def __init__(self, initial: float) -> None:
        self._initial = initial
        self._passes: deque[tuple[float, float]] = deque(maxlen=self.WINDOW)
        self._lock = threading.Lock()

    def record(self, flops: float, seconds: float) -> None:
        with self._lock:
            self._passes.append((flops, max(seconds, 1e-6)))

    @property
    def rate(self) -> float:
        with self._lock:
            if not self._passes:
                return self._initial
            return sum(f for f, _ in self._passes) / sum(s for _, s in self._passes)


def result_within(future: "Future[T]", seconds: float) -> T:
    """The result of work queued on a model worker; `Overloaded` (retry in 5 s) past `seconds`."""
    try:
        return future.result(timeout=seconds)
    except TimeoutError:
        raise Overloaded(f"the model did not answer within {seconds:.0f} s; retry later", 5) from None


def nbytes_of(value: Any) -> int:
    """Bytes a cached value holds: `.nbytes` where it has it, else the sum over a tuple of arrays."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return sum(int(v.nbytes) for v in value)


class ModelWorker:
    """One thread that runs every piece of model work, in order, under `torch.inference_mode()`.

    Requests wait in a bounded queue. Idle work (speculative prefetch) runs only when no request
    is waiting, one small job at a time, so it delays a request by at most one such job.
    """

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE, lock: threading.Lock | None = None) -> None:
        """`lock`: held around each job, shared by the workers of one model (default: its own)."""
        self.queue_size = queue_size
        self._lock = lock if lock is not None else threading.Lock()
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._idle: OrderedDict[Hashable, Callable[[], Any]] = OrderedDict()
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()
        _WORKERS.add(self)

    def submit(self, fn: Callable[[], T], bounded: bool = True) -> "Future[T]":
        """Queue `fn`. `bounded=False` is for the next chunk of work already admitted (a job's
        continuation): it queues behind the requests waiting now, so they run first, and is
        never refused."""
        fut: Future[T] = Future()
        with self._cv:
            if bounded and len(self._jobs) >= self.queue_size:
                raise Overloaded(f"the model queue is full ({self.queue_size} requests waiting); retry shortly")
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    def submit_idle(self, key: Hashable, fn: Callable[[], Any]) -> None:
        """Run `fn` when nothing else waits; a job with the same key already pending is kept."""
        with self._cv:
            if not self._closed and key not in self._idle:
                self._idle[key] = fn
                self._cv.notify_all()

    def on_worker(self) -> bool:
        """Whether the caller is this worker's thread (which must never wait on its own queue)."""
        return threading.current_thread() is self._thread

    def pending(self) -> int:
        """Requests waiting (idle work not counted)."""
        with self._cv:
            return len(self._jobs)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request or idle job is queued or running (benchmarks, tests)."""
        with self._cv:
            return self._cv.wait_for(lambda: not (self._jobs or self._idle or self._busy), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Drop idle work and let the running job finish. Called at interpreter exit: a daemon
        thread stopped inside torch's C++ code aborts the whole process."""
        with self._cv:
            self._closed = True
            self._idle.clear()
        self.wait_idle(timeout)

    def _next(self) -> tuple[Callable[[], Any], Future | None]:
        with self._cv:
            self._busy = False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._jobs or self._idle)
            self._busy = True
            if self._jobs:
                return self._jobs.popleft()
            return self._idle.popitem(last=False)[1], None

    def _loop(self) -> None:
        while True:
            fn, fut = self._next()
            if fut is not None and not fut.set_running_or_notify_cancel():
                continue
            try:
                with self._lock, torch.inference_mode():
                    result = fn()
                if fut is not None:
                    fut.set_result(result)
            except BaseException as exc:  # delivered to the waiting request, never kills the worker
                if fut is not None:
                    fut.set_exception(exc)
                else:
                    log.exception("idle job failed")


_WORKERS: "weakref.WeakSet[ModelWorker]" = weakref.WeakSet()
atexit.register(lambda: [worker.close() for worker in list(_WORKERS)])


class CacheBudget:
    """One byte bound and one LRU order shared by several caches (one per loaded model).

    Its lock is every member cache's lock, so a store that pushes the total over the bound can
    evict the least recently used item of any model without lock-ordering problems.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.lock = threading.Lock()
        # (cache id, key) -> cache, least recently used first
        self.order: OrderedDict[tuple[int, Hashable], "ByteLRU"] = OrderedDict()


class ByteLRU:
    """LRU cache bounded by the bytes of its values, with single-flight computation.

    `get_or_compute(key, fn)` returns the cached value, or joins the in-flight computation of
    the same key, or submits `fn` to the worker. A value larger than the whole bound is returned
    but not kept. Caches given the same `budget` share one bound and one LRU order (one server,
    several models); by default a cache has its own.
    """

    def __init__(self, worker: ModelWorker, max_bytes: int = DEFAULT_CACHE_BYTES,
                 wait_seconds: float = DEFAULT_WAIT_SECONDS, budget: CacheBudget | None = None) -> None:
        self.worker = worker
        self.budget = budget if budget is not None else CacheBudget(max_bytes)
        self.wait_seconds = wait_seconds
        self._items: dict[Hashable, Any] = {}
        self._inflight: dict[Hashable, Future] = {}
        self._lock = self.budget.lock
        self.bytes = 0  # this cache's share of budget.bytes
        self.hits = 0
        self.misses = 0
        self.computations = 0

    def get_or_compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Cached value of `key`, computing it with `fn` on the worker if needed. Called from the
        worker thread itself (a job's chunk), it computes inline instead of queueing behind itself."""
        if self.worker.on_worker():
            with self._lock:
                if key in self._items:
                    return self._hit(key)
                self.misses += 1
            return self._compute(key, fn)
        with self._lock:
            if key in self._items:
                return self._hit(key)
            self.misses += 1
            fut = self._inflight.get(key)
            if fut is None:
                fut = self.worker.submit(lambda: self._compute(key, fn))
                self._inflight[key] = fut
        return result_within(fut, self.wait_seconds)

    @property
    def max_bytes(self) -> int:
        return self.budget.max_bytes

    def _hit(self, key: Hashable) -> Any:
        """A cached value, marked most recently used (call under the lock)."""
        self.budget.order.move_to_end((id(self), key))
        self.hits += 1
        return self._items[key]

    def get(self, key: Hashable) -> Any | None:
        """The cached value, or None; does not count as a hit or change the LRU order."""
        with self._lock:
            return self._items.get(key)

    def fill(self, key: Hashable, value: Any) -> None:
        """Store a value computed ahead of a request (prefetch), unless the key is already there."""
        self._store(key, value)

    def _compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        try:
            with self._lock:
                if key in self._items:  # filled by prefetch while this job was queued
                    return self._items[key]
            value = fn()
            self.computations += 1
            self._store(key, value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _store(self, key: Hashable, value: Any) -> None:
        size = nbytes_of(value)
        budget = self.budget
        with self._lock:
            if size > budget.max_bytes or key in self._items:
                return
            self._items[key] = value
            self.bytes += size
            budget.bytes += size
            budget.order[(id(self), key)] = self
            while budget.bytes > budget.max_bytes:
                (_, old_key), owner = budget.order.popitem(last=False)
                owner._drop(old_key)

    def _drop(self, key: Hashable) -> None:
        """Forget one item (call under the lock)."""
        n = nbytes_of(self._items.pop(key))
        self.bytes -= n
        self.budget.bytes -= n

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "computations": self.computations}

    def clear(self) -> None:
        with self._lock:
            for key in list(self._items):
                del self.budget.order[(id(self), key)]
                self._drop(key)


def tune_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc only): no mmap, no trimming, one arena.

    By default glibc gives each large tensor fresh pages from the kernel and returns them on free,
    so every forward pass page-faults through its activations again; on the 2-core test machine
    that made a 1024-token pass ~1.5x slower and an 8-token pass ~1.3x slower (bench/RESULTS.md).
    One arena: memory freed by one thread (the model worker, torch's OpenMP threads, HTTP
    threads) is reused by the others instead of each thread's arena keeping its own high-water
    mark; serving two 1024-token texts peaked 2.2 GB above the model with per-thread arenas and
    1.4 GB with one. The cost: the resident size stays at its high-water mark instead of
    shrinking when idle. Call it before starting threads. Returns whether the settings applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all([libc.mallopt(m_mmap_max, 0), libc.mallopt(m_trim_threshold, 2**31 - 1),
                libc.mallopt(m_arena_max, 1)])
