"""Serialized model work, a byte-bounded LRU cache of forward passes, and single-flight.

The bridge is not thread-safe (hooks are shared state), so every use of the model runs on one
worker thread fed by a bounded queue; a full queue is refused at once (`Overloaded`) instead of
piling up waiting threads. Results are cached by key with LRU eviction under a byte bound, and
concurrent requests for the same key share one computation.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, TypeVar

import torch

log = logging.getLogger("explorer")
T = TypeVar("T")

DEFAULT_CACHE_BYTES = 1 << 30  # 1 GiB: a few 1024-token GPT-2-small texts, hundreds of short ones
DEFAULT_QUEUE_SIZE = 16
DEFAULT_WAIT_SECONDS = 120.0


class Overloaded(RuntimeError):
    """The model queue is full (or the wait for a result timed out); try again later."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Run:
    """Cached activations of one text.

    token_ids: [seq] (BOS first); resid: [n_layers, seq, d_model] float32 (resid_post of each
    block); patterns: [n_layers, n_heads, seq, seq] float16 (row = query, column = key).
    """

    token_ids: torch.Tensor
    resid: torch.Tensor
    patterns: torch.Tensor
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.token_ids, self.resid, self.patterns))


def nbytes_of(value: Any) -> int:
    """Bytes a cached value holds: `.nbytes` where it has it, else the sum over a tuple of arrays."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    return sum(int(v.nbytes) for v in value)


class ModelWorker:
    """One thread that runs every piece of model work, in order, under `torch.inference_mode()`."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._queue: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        fut: Future[T] = Future()
        try:
            self._queue.put_nowait((fn, fut))
        except queue.Full:
            raise Overloaded(f"the model queue is full ({self.queue_size} requests waiting); retry shortly") from None
        return fut

    def pending(self) -> int:
        return self._queue.qsize()

    def _loop(self) -> None:
        while True:
            fn, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                with torch.inference_mode():
                    fut.set_result(fn())
            except BaseException as exc:  # delivered to the waiting request, never kills the worker
                fut.set_exception(exc)


class ByteLRU:
    """LRU cache bounded by the bytes of its values, with single-flight computation.

    `get_or_compute(key, fn)` returns the cached value, or joins the in-flight computation of
    the same key, or submits `fn` to the worker. A value larger than the whole bound is returned
    but not kept.
    """

    def __init__(self, worker: ModelWorker, max_bytes: int = DEFAULT_CACHE_BYTES,
                 wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        self.worker = worker
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.computations = 0

    def get_or_compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            fut = self._inflight.get(key)
            if fut is None:
                fut = self.worker.submit(lambda: self._compute(key, fn))
                self._inflight[key] = fut
        try:
            return fut.result(timeout=self.wait_seconds)
        except TimeoutError:
            raise Overloaded(f"the model did not answer within {self.wait_seconds:.0f} s; retry later", 5) from None

    def _compute(self, key: Hashable, fn: Callable[[], T]) -> T:
        try:
            value = fn()
            self.computations += 1
            self._store(key, value)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _store(self, key: Hashable, value: Any) -> None:
        size = nbytes_of(value)
        with self._lock:
            if size > self.max_bytes:
                return
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= nbytes_of(old)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "computations": self.computations}

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
