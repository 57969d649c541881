"""The activation cache: hits skip the model, the byte bound holds with LRU eviction, concurrent
identical requests compute once, prefetch yields to requests, and cached answers equal uncached."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson

from explorer.operations import predict
from explorer.operations.predict import PREFETCH_POSITIONS
from explorer.runtime.engine import ByteLRU, ModelWorker
from model_utils import Explorer
from tests.helpers import TEXT


def every_endpoint(ex: Explorer, text: str) -> list[bytes]:
    n_layers, n_heads = int(ex.model.cfg.n_layers), int(ex.model.cfg.n_heads)
    seq = len(ex.tokens(text)[0])
    answers = [ex.tokenize(text), ex.trace(text, None), ex.trace(text, [1, seq - 1])]
    answers += [ex.attention(text, l, h) for l in range(n_layers) for h in (None, *range(n_heads))]
    answers += [ex.predict(text, p, 10) for p in range(seq)]
    return [orjson.dumps(a, option=orjson.OPT_SERIALIZE_NUMPY) for a in answers]


def test_hits_skip_the_model(tiny_model, calls):
    ex = Explorer(tiny_model)
    first = every_endpoint(ex, TEXT)
    assert len(calls["forward"]) == 1  # every endpoint, layer, head and position shares one pass
    ex.worker.wait_idle(30)
    n = {name: len(c) for name, c in calls.items()}
    hits = ex.cache.stats()["hits"]
    assert every_endpoint(ex, TEXT) == first
    assert {name: len(c) for name, c in calls.items()} == n  # nothing recomputed
    assert ex.cache.stats()["hits"] > hits


def test_cached_answers_equal_uncached(tiny_model, calls):
    warm = Explorer(tiny_model)
    every_endpoint(warm, TEXT)
    assert warm.worker.wait_idle(30)  # let prefetch fill the other positions
    uncached = Explorer(tiny_model, cache_bytes=0)  # nothing fits: every call recomputes
    assert every_endpoint(warm, TEXT) == every_endpoint(uncached, TEXT)
    assert uncached.cache.stats()["entries"] == 0
    assert len(calls["forward"]) > 2  # the uncached explorer really ran the model per request


def test_prefetch_fills_nearby_positions_then_predict_skips_the_model(tiny_model, calls):
    ex = Explorer(tiny_model)
    text = "one two three four five six seven eight nine ten eleven twelve"
    seq = len(ex.tokens(text)[0])
    assert seq <= PREFETCH_POSITIONS
    ex.predict(text, 3, 5)
    assert ex.worker.wait_idle(30)
    assert sorted(pos for _, pos in calls["lens_top_k"]) == list(range(seq))  # each position once
    before = len(calls["lens_top_k"])
    for p in range(seq):
        ex.predict(text, p, 5)
    assert len(calls["lens_top_k"]) == before


def test_prefetch_is_dropped_when_the_run_was_evicted(tiny_model, calls):
    ex = Explorer(tiny_model)
    seq = len(ex.run(TEXT).token_ids)
    release = threading.Event()
    ex.worker.submit(lambda: release.wait(10))  # hold the worker so the idle jobs wait
    predict._prefetch(ex, TEXT, 1, seq)
    ex.cache.clear()
    release.set()
    assert ex.worker.wait_idle(30)
    assert calls["lens_top_k"] == []  # no lens of an evicted run, and no forward rerun for it
    assert len(calls["forward"]) == 1


def test_eviction_respects_byte_bound_and_is_lru(tiny_model, calls):
    probe = Explorer(tiny_model)
    run_bytes = probe.run(TEXT).nbytes
    ex = Explorer(tiny_model, cache_bytes=int(run_bytes * 3.5))  # about three runs of this length
    texts = [f"{TEXT} number {i}" for i in range(12)]
    for i, text in enumerate(texts):
        ex.run(text)
        ex.run(texts[0])  # keep the first text recently used
        stats = ex.cache.stats()
        assert stats["bytes"] <= stats["max_bytes"]
        assert stats["bytes"] == sum(v.nbytes for v in ex.cache._items.values())
    assert ex.cache.get(("run", texts[0])) is not None  # recently used: survived 11 newer texts
    assert ex.cache.get(("run", texts[1])) is None  # least recently used: evicted
    forwards = len(calls["forward"])
    ex.run(texts[0])
    assert len(calls["forward"]) == forwards


class Blob:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_byte_lru_unit_bound_oversize_and_fill():
    cache = ByteLRU(ModelWorker(), max_bytes=100)
    for i in range(10):
        cache.get_or_compute(i, lambda: Blob(30))
        assert cache.bytes <= 100
    assert [k for k in range(10) if cache.get(k) is not None] == [7, 8, 9]
    big = cache.get_or_compute("big", lambda: Blob(101))
    assert big.nbytes == 101 and cache.get("big") is None  # returned, not kept
    kept = cache.get(9)
    cache.fill(9, Blob(1))
    assert cache.get(9) is kept and cache.bytes == 90  # fill never replaces a cached value
    cache.fill("small", Blob(10))
    assert cache.bytes == 100 and cache.get(7) is not None


def test_single_flight_under_threads():
    cache = ByteLRU(ModelWorker(), max_bytes=1 << 20)
    computed: list[int] = []

    def slow() -> np.ndarray:
        computed.append(1)
        time.sleep(0.2)
        return np.zeros(10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.get_or_compute("key", slow), range(8)))
    assert len(computed) == 1
    assert all(r is results[0] for r in results)
    assert cache.stats()["misses"] == 8 and cache.stats()["computations"] == 1


def test_requests_run_before_idle_work():
    worker = ModelWorker()
    order: list[str] = []
    release = threading.Event()
    worker.submit(lambda: release.wait(10))
    worker.submit_idle("idle", lambda: order.append("idle"))
    worker.submit_idle("idle", lambda: order.append("duplicate"))  # same key: kept once
    request = worker.submit(lambda: order.append("request"))
    release.set()
    request.result(10)
    assert worker.wait_idle(10)
    assert order == ["request", "idle"]


def test_cached_run_is_compact(tiny_model):
    run = Explorer(tiny_model).run(TEXT)
    cfg = tiny_model.cfg
    seq = len(run.token_ids)
    assert run.patterns.dtype.itemsize == 2  # float16 patterns
    assert run.nbytes == seq * 8 + cfg.n_layers * seq * cfg.d_model * 4 + cfg.n_layers * cfg.n_heads * seq * seq * 2
