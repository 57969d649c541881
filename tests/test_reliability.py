"""Concurrency, overload, disconnects and start-up failures: nothing crashes or wedges the server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app import create_app, is_loopback
from tests.helpers import TEXT, waitress_serving

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [TEXT, "Attention is all you need, they said.", "1 2 3 4 5 6 7 8 9 10", "Ünïcödé 数学 🙂"]


def mixed_requests() -> list[tuple[str, dict]]:
    reqs: list[tuple[str, dict]] = []
    for text in TEXTS:
        reqs.append(("/tokenize", {"text": text}))
        reqs.append(("/trace", {"text": text}))
        for layer in range(3):
            reqs.append(("/attention", {"text": text, "layer": layer}))
            reqs.append(("/attention", {"text": text, "layer": layer, "head": layer}))
        for pos in (0, 2, 4):
            reqs.append(("/predict", {"text": text, "token_index": pos, "top_k": 3 + pos}))
    return reqs


def test_eight_concurrent_clients_get_single_client_answers(tiny_model, calls):
    reqs = mixed_requests()
    single = create_app(model=tiny_model).test_client()
    expected = [single.post(path, json=body).data for path, body in reqs]
    assert single.application.extensions["explorer"].worker.wait_idle(30)  # its prefetch too
    for log in calls.values():  # count only the concurrent clients' work
        log.clear()
    app = create_app(model=tiny_model)  # fresh cache: the concurrent clients race to compute

    def call(i: int) -> bytes:
        client = app.test_client()
        path, body = reqs[i]
        r = client.post(path, json=body)
        assert r.status_code == 200
        return r.data

    order = [i for _ in range(2) for i in range(len(reqs))]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, order))
    mismatches = sum(g != expected[i] for g, i in zip(got, order))
    assert mismatches == 0
    # single-flight: one forward and one trace PCA per text, and each (text, position) lens
    # once, whether a request or idle-time prefetch computed it, however many clients raced
    assert app.extensions["explorer"].worker.wait_idle(30)
    assert len(calls["forward"]) == len(TEXTS)
    assert len(calls["trace_pca"]) == len(TEXTS)
    lens = [(id(run), pos) for run, pos in calls["lens_top_k"]]
    assert len(lens) == len(set(lens)) >= len(TEXTS) * 3


def blocked_worker(app):
    """Occupy the model worker until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    app.extensions["explorer"].worker.submit(hold)
    assert started.wait(10)
    return release


def test_full_queue_answers_503_at_once_and_health_stays_up(tiny_model):
    app = create_app({"QUEUE_SIZE": 1}, model=tiny_model)
    client = app.test_client()
    release = blocked_worker(app)
    try:
        waiting = threading.Thread(target=lambda: client.post("/trace", json={"text": "queued text"}))
        waiting.start()  # fills the only queue slot
        deadline = time.monotonic() + 5
        while app.extensions["explorer"].worker.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        r = client.post("/trace", json={"text": "another text"})
        assert r.status_code == 503 and r.is_json and "busy" in r.get_json()["error"]
        assert int(r.headers["Retry-After"]) >= 1
        health = client.get("/health")
        assert health.status_code == 200 and health.get_json()["queue"] == 1
        assert time.monotonic() - start < 2  # refused at once, not after waiting for the model
    finally:
        release.set()
    waiting.join(10)
    assert client.post("/trace", json={"text": "another text"}).status_code == 200


def test_model_error_is_json_500_and_leaves_server_working(tiny_model, monkeypatch):
    import explorer.math.forward

    app = create_app(model=tiny_model)
    client = app.test_client()
    real = explorer.math.forward.forward
    monkeypatch.setattr(explorer.math.forward, "forward", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    r = client.post("/tokenize", json={"text": "x"})
    assert r.status_code == 200  # tokenizing needs no forward pass
    r = client.post("/trace", json={"text": "fails once"})
    assert r.status_code == 500 and r.get_json() == {"error": "internal error (details are in the server log)"}
    assert b"Traceback" not in r.data and b"boom" not in r.data
    monkeypatch.setattr(explorer.math.forward, "forward", real)
    assert client.post("/trace", json={"text": "fails once"}).status_code == 200


@pytest.fixture()
def live_server(tiny_model):
    with waitress_serving(create_app(model=tiny_model), threads=4) as server:
        yield server.effective_port


def http(port: int, raw: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def post(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def test_client_disconnects_mid_request_do_not_hurt(live_server):
    port = live_server
    for i in range(5):
        with socket.create_connection(("127.0.0.1", port)) as s:  # half a body, then hang up
            s.sendall(post("/predict", b'{"text": "disconnect %d", "token_index": 1}' % i)[:-10])
        with socket.create_connection(("127.0.0.1", port)) as s:  # full request, hang up before reading
            s.sendall(post("/attention", b'{"text": "gone %d", "layer": 1}' % i))
    reply = http(port, post("/predict", b'{"text": "still alive", "token_index": 1}'))
    assert reply.startswith(b"HTTP/1.1 200")
    assert b'"predictions_by_layer"' in reply


def test_dns_rebinding_blocked_on_real_server(live_server):
    assert http(live_server, post("/tokenize", b'{"text": "x"}', host="attacker.example")).startswith(b"HTTP/1.1 400")
    assert http(live_server, post("/tokenize", b'{"text": "x"}', host="localhost:1")).startswith(b"HTTP/1.1 200")


def run_app(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


@pytest.mark.slow  # starts app.py in a subprocess
def test_unloadable_model_exits_with_one_clear_paragraph(tmp_path):
    result = run_app("--model", str(tmp_path / "missing-dir"), "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "--random-weights" in result.stderr and "--model" in result.stderr
    assert "anyone who can reach this address" in result.stderr  # non-loopback bind warning


def test_loopback_detection():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "example.org", "::"]))
