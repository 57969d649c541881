"""Long requests under control (issue 27), on the tiny model with bounds derived from it: admission
by estimated cost, chunks short enough for interactive requests, cancel and disconnect within a
chunk, memory refused past the work budget, and no silent nulls."""
from __future__ import annotations

import json
import socket
import time

import numpy as np
import pytest

from app import create_app
from explorer.errors import InvalidRequest
from explorer.math import tracing
from explorer.math.replay import row_bytes
from explorer.operations import base, causal_trace, patch
from explorer.operations.base import non_finite, shape
from explorer.operations.causal_trace import CausalTraceResponse, max_noise, noisy_bytes
from tests.helpers import FACT, PAIR, TARGET, err, ok, wait_job, waitress_serving

# The longest prompt pair the tiny model holds (n_ctx 64), differing at its first text token so
# that every cell of a sweep runs.
WORDS = " ".join(f"w{i}" for i in range(30))
LONG_CLEAN, LONG_CORRUPT = "Alice " + WORDS, "Bob " + WORDS
LONG = {"clean": LONG_CLEAN, "corrupt": LONG_CORRUPT, **TARGET}


# --- no silent nulls --------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [1e300, 3.4e38])
def test_noise_beyond_what_the_dtype_carries_is_refused(client, noise):
    message = err(client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "noise": noise}))
    bound = max_noise(client.application.extensions["explorer"])
    assert message.startswith(f"noise must be a positive number at most {bound:.3g}")


def test_noise_at_the_bound_gives_finite_numbers(client):
    ex = client.application.extensions["explorer"]
    body = ok(client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "samples": 2,
                                                 "noise": max_noise(ex)}))
    assert body["corrupt_prob"] is not None and np.isfinite(body["corrupt_prob"])
    assert all(v is not None and np.isfinite(v) for row in body["scores"] for v in row)


def test_a_non_finite_answer_is_an_error_not_nulls(client, monkeypatch):
    monkeypatch.setattr(tracing, "corrupt_probability", lambda *a: np.float32("nan"))
    message = err(client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "samples": 2}))
    assert "overflowed" in message and "corrupt_prob" in message


def test_shape_counts_non_finite_numbers():
    assert non_finite([[1.0, float("inf")], [float("nan"), 2.0]]) == 2
    assert non_finite([None, -1.5]) == 0  # a null the API documents (token_logprobs[0]) is not a number
    with pytest.raises(InvalidRequest, match="scores would hold 1 non-finite"):
        shape(CausalTraceResponse, tokens=[], subject_positions=[], kind="resid", answer={"token": "a", "token_id": 0},
              clean_prob=0.5, corrupt_prob=0.1, scores=np.array([[np.inf]]), recovery=None, noise=1.0,
              samples=1, seed=0, window=None)


# --- admission by cost ------------------------------------------------------------------------

def estimate(ex, body: dict) -> float:
    req = base.parse(patch.PatchRequest, body)
    c = patch.cost(ex, req)
    return ex.seconds(c.work, c.seq)


def test_sync_request_over_the_time_bound_is_refused_and_runs_async(client, monkeypatch):
    ex = client.application.extensions["explorer"]
    small, big = {**PAIR, "site": "heads"}, {**LONG, "site": "heads_by_position"}
    assert estimate(ex, big) > 4 * estimate(ex, small)
    # bounds between the two estimates: the machine's measured speed, not fixed seconds
    monkeypatch.setattr(base, "SYNC_SECONDS", 2 * estimate(ex, small))
    ok(client.post("/patch", json=small))
    message = err(client.post("/patch", json=big))
    assert 'send "async": true' in message and "GFLOP/s measured" in message
    job = client.post("/patch", json={**big, "async": True})
    assert job.status_code == 202
    assert wait_job(client, job.get_json()["job"], 120)["status"] == "done"
    monkeypatch.setattr(base, "ASYNC_SECONDS", 2 * estimate(ex, small))
    message = err(client.post("/patch", json={**big, "async": True}))
    assert "a job may take" in message and "heads instead of heads_by_position" in message


def test_memory_past_the_work_budget_is_refused(tiny_model):
    probe = create_app({"TESTING": True}, model=tiny_model).extensions["explorer"]
    seq = len(probe.tokens(FACT)[0])
    fits_two = noisy_bytes(probe, seq, 2) + 2 * row_bytes(probe.cfg, seq)
    client = create_app({"TESTING": True, "WORK_BYTES": fits_two}, model=tiny_model).test_client()
    body = {"text": FACT, "subject": "Eiffel Tower"}
    ok(client.post("/causal_trace", json={**body, "samples": 2}))
    message = err(client.post("/causal_trace", json={**body, "samples": 3}))
    assert "MiB of working memory" in message and "--work-mb" in message and "fewer samples" in message


# --- chunks, cancel, disconnect ---------------------------------------------------------------

def started(client, path: str, body: dict) -> str:
    """Start a job and wait until its first chunk has run."""
    job = client.post(path, json={**body, "async": True}).get_json()["job"]
    deadline = time.monotonic() + 30
    while ok(client.get(f"/jobs/{job}"))["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.01)
    return job


def test_an_interactive_request_waits_for_at_most_one_chunk(client):
    cold = time.perf_counter()
    ok(client.post("/lens", json={"text": "A first new text, read cold on an idle server."}))
    cold = time.perf_counter() - cold
    jobs = [started(client, "/patch", {**LONG, "site": "heads_by_position", "direction": d})
            for d in ("denoise", "noise")]
    busy = time.perf_counter()
    ok(client.post("/lens", json={"text": "Another new text, read while two sweeps run."}))
    busy = time.perf_counter() - busy
    states = [ok(client.get(f"/jobs/{j}")) for j in jobs]
    assert any(s["status"] == "running" for s in states), states  # the sweeps were still going
    assert busy <= cold + 1.0, (busy, cold)
    for j in jobs:
        client.delete(f"/jobs/{j}")


def test_delete_ends_a_causal_trace_within_two_seconds(client):
    body = {"text": LONG_CLEAN, "subject": "Alice", "samples": 50, "kind": "mlp"}
    ex = client.application.extensions["explorer"]
    ex.acts(LONG_CLEAN)  # measures the model's speed
    full = causal_trace.cost(ex, base.parse(causal_trace.CausalTraceRequest, body), 1)
    assert ex.seconds(full.work, full.seq) > 6  # the whole trace would keep the worker far longer
    job = started(client, "/causal_trace", body)
    assert ok(client.get(f"/jobs/{job}"))["status"] == "running"
    asked = time.monotonic()
    client.delete(f"/jobs/{job}")
    assert wait_job(client, job, 10)["status"] == "cancelled"
    assert time.monotonic() - asked < 2.0
    assert ex.worker.wait_idle(2.0)


def test_a_sync_request_stops_when_its_client_disconnects(tiny_model, monkeypatch):
    monkeypatch.setattr(base, "SYNC_SECONDS", 1e9)  # admitted however long: the client leaves first
    app = create_app({"TESTING": True}, model=tiny_model)
    ex = app.extensions["explorer"]
    body = {"text": LONG_CLEAN, "subject": "Alice", "samples": 50, "kind": "mlp"}
    req = base.parse(causal_trace.CausalTraceRequest, body)
    ex.acts(LONG_CLEAN)  # measures the model's speed
    full = causal_trace.cost(ex, req, 1)
    assert ex.seconds(full.work, full.seq) > 6  # the whole trace would keep the worker far longer
    with waitress_serving(app, channel_request_lookahead=4, threads=2) as server:
        data = json.dumps(body).encode()
        sock = socket.create_connection(("127.0.0.1", server.effective_port))
        sock.sendall(b"POST /causal_trace HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(1.0)
        assert not ex.worker.wait_idle(0), "the trace should be running"
        sock.close()
        left = time.monotonic()
        assert ex.worker.wait_idle(5.0), "the trace went on after its client left"
        assert time.monotonic() - left < 3.0


def test_a_sync_score_during_a_long_job_answers(client):
    """No wait limit, no 503: a synchronous request is served between the job's chunks."""
    job = started(client, "/patch", {**LONG, "site": "heads_by_position"})
    r = client.post("/score", json={"text": "Scored while the sweep runs."})
    assert r.status_code == 200, r.data
    assert ok(client.get(f"/jobs/{job}"))["status"] in ("running", "done")
    client.delete(f"/jobs/{job}")


def test_noisy_runs_split_over_chunks_give_the_same_trace(client, monkeypatch):
    """A long text's cells replay their noisy runs a few at a time (one block of all of them
    would be a long chunk): forced here to one run per chunk, the trace is the same."""
    from explorer.math import replay

    body = {"text": FACT, "subject": "Eiffel Tower", "samples": 4, "kind": "mlp", "window": 2}
    whole = ok(client.post("/causal_trace", json=body))
    client.application.extensions["explorer"].cache.clear()
    monkeypatch.setattr(replay, "budget", lambda cfg, seq, *a: replay.Budget(64, float(seq)))
    split = ok(client.post("/causal_trace", json=body))
    np.testing.assert_allclose(split["scores"], whole["scores"], rtol=1e-5, atol=1e-9)
    assert split["corrupt_prob"] == pytest.approx(whole["corrupt_prob"], rel=1e-5)


@pytest.mark.parametrize("cancellable", [True, False])
def test_a_cancel_stops_a_long_pass_between_blocks(tiny_model, cancellable):
    """A cancel that arrives while one forward pass runs (a 1000-token capture takes seconds) stops
    it after the block running now, not at the end of the pass; an interactive request's pass (not a
    job's chunk) is never interrupted."""
    from explorer.errors import Cancelled
    from explorer.math import forward as fw
    from explorer.runtime.engine import ModelWorker
    from explorer.runtime.jobs import Job

    bridge, n_layers = tiny_model.bridge, int(tiny_model.cfg.n_layers)
    reached: list[int] = []
    job: Job | None = None

    def block_done(layer: int):
        def hook(tensor, hook) -> None:
            reached.append(layer)
            if layer == 0 and job is not None:
                job.cancel()  # DELETE while the pass is in block 1
        return hook

    def pass_() -> None:
        with bridge.hooks(fwd_hooks=[(fw.resid_hook(l), block_done(l)) for l in range(n_layers)]):
            fw.forward(bridge, [1, 2, 3, 4, 5])

    def steps():
        pass_()
        yield 1.0
        return "finished"

    worker = ModelWorker(lock=tiny_model.lock)
    try:
        if cancellable:
            job = Job("test", steps(), worker)
            job.start()
            with pytest.raises(Cancelled):
                job.done.result(timeout=30)
            assert job.status == "cancelled" and reached == [0]
        else:
            worker.submit(pass_).result(timeout=30)
            assert reached == list(range(n_layers))
    finally:
        worker.close()


def test_in_turns_runs_a_blocking_function_as_chunks_never_alongside_the_caller():
    """`in_turns`: each next() runs the function to its next pause, the caller waits meanwhile (the
    two threads never run at once), the function's value is the result and its error is raised."""
    import threading

    from explorer.runtime.jobs import in_turns

    log: list[str] = []
    inside = threading.Lock()

    def fn(pause) -> str:
        for i in range(3):
            assert inside.acquire(blocking=False)  # the caller is not running meanwhile
            log.append(f"work {i}")
            inside.release()
            pause()
        return "value"

    steps = in_turns(fn)
    assert log == []  # nothing runs before the first next()
    chunks = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            assert stop.value == "value"
            break
        assert inside.acquire(blocking=False)
        log.append(f"caller {chunks}")
        inside.release()
        chunks += 1
    assert log == ["work 0", "caller 0", "work 1", "caller 1", "work 2", "caller 2"]

    def fails(pause) -> None:
        pause()
        raise ValueError("from the function")

    broken = in_turns(fails)
    next(broken)
    with pytest.raises(ValueError, match="from the function"):
        next(broken)


def test_closing_in_turns_unwinds_the_paused_function():
    import threading

    from explorer.runtime.jobs import in_turns

    unwound, after_pause = threading.Event(), []

    def fn(pause) -> None:
        try:
            pause()
            after_pause.append("ran")  # never: the pause raises once the steps are closed
        finally:
            unwound.set()

    steps = in_turns(fn)
    next(steps)
    steps.close()
    assert unwound.is_set() and after_pause == []  # close() returned after the function unwound
    assert not any(t.name == "turns" and t.is_alive() for t in threading.enumerate())
    never = in_turns(fn)
    never.close()  # never started: no thread was made
    assert not any(t.name == "turns" and t.is_alive() for t in threading.enumerate())
