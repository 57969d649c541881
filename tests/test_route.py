"""scripts/route.py: one text always reaches the same replica (so its cache is hit), losing a
replica moves only its own texts, and job polls find the replica that runs the job."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from werkzeug.serving import make_server

from app import create_app
from scripts.route import ranked, route_key, serve
from tests.helpers import CLEAN, EVERY_ENDPOINT, TEXT, running


def call(base: str, path: str, body: dict | None = None, method: str | None = None) -> tuple[int, dict, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp), resp.headers["X-Replica"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers["X-Replica"]


def test_rendezvous_is_stable_and_moves_only_a_lost_replicas_texts():
    replicas = [f"http://127.0.0.1:{5001 + i}" for i in range(3)]
    keys = [route_key(json.dumps({"text": f"text {i}", "layer": i % 3}).encode()) for i in range(300)]
    owner = {k: ranked(replicas, k)[0] for k in keys}
    share = {r: sum(o == r for o in owner.values()) for r in replicas}
    assert all(60 < n < 140 for n in share.values()), share  # spread over every replica
    assert route_key(b'{"text": "a", "layer": 0}') == route_key(b'{"layer": 5, "text": "a"}')  # text, not body
    assert route_key(b'{"text": "a"}') != route_key(b'{"text": "a", "model": "b"}')
    assert route_key(json.dumps({"clean": CLEAN, "corrupt": "x"}).encode()) == json.dumps([None, CLEAN])
    survivors = replicas[:2]
    for k in keys:  # rendezvous: only the lost replica's texts move
        if owner[k] != replicas[2]:
            assert ranked(survivors, k)[0] == owner[k]


@pytest.fixture()
def cluster(tiny_model):
    """Two replicas of the tiny model's app behind the proxy: (proxy URL, replica URLs, apps)."""
    apps = [create_app({"TESTING": True}, model=tiny_model) for _ in range(2)]
    servers = [make_server("127.0.0.1", 0, a, threaded=True) for a in apps]
    with running(servers[0]), running(servers[1]):
        urls = [f"http://127.0.0.1:{s.server_port}" for s in servers]
        with running(serve(urls, port=0)) as proxy:
            yield f"http://127.0.0.1:{proxy.server_port}", urls, apps


@pytest.mark.slow  # real HTTP servers: two replicas behind the proxy
def test_proxy_sends_a_text_to_one_replica_and_its_cache(cluster):
    proxy, urls, apps = cluster
    texts = [f"{TEXT} number {i}" for i in range(8)]
    for text in texts:
        seen = {call(proxy, path, {"text": text, **extra})[2]
                for path, extra in (("/tokenize", {}), ("/attention", {"layer": 0}), ("/predict", {"token_index": 1}))}
        assert seen == {ranked(urls, json.dumps([None, text]))[0]}
    assert len({ranked(urls, json.dumps([None, t]))[0] for t in texts}) == 2  # both replicas used
    # each text ran its forward pass once, on its own replica only
    runs = [sum(1 for k in a.extensions["explorer"].cache._items if k[0] == "run") for a in apps]
    assert sum(runs) == len(texts) and all(runs)
    status, body, _ = call(proxy, "/attention", {"text": TEXT, "layer": 99})
    assert status == 400 and "layer" in body["error"]  # errors pass through unchanged
    assert call(proxy, "/model")[1] == apps[0].test_client().get("/model").get_json()


@pytest.mark.slow  # real HTTP servers: two replicas behind the proxy
def test_job_polls_reach_the_replica_running_the_job(cluster):
    proxy, urls, _ = cluster
    path, body = EVERY_ENDPOINT[-1]
    status, started, replica = call(proxy, path, body)
    assert status == 202
    other = next(u for u in urls if u != replica)
    assert call(other, f"/jobs/{started['job']}")[0] == 404  # the other replica does not know it
    for _ in range(600):
        status, state, _ = call(proxy, f"/jobs/{started['job']}")
        if state["status"] == "done":
            break
    assert status == 200 and state["status"] == "done"
    assert call(proxy, "/jobs/0123456789abcdef")[0] == 404


@pytest.mark.slow  # real HTTP servers: two replicas behind the proxy
def test_a_replica_down_hands_its_texts_to_the_next(cluster):
    proxy, urls, _ = cluster
    text = next(t for t in (f"t{i}" for i in range(100)) if ranked(urls, json.dumps([None, t]))[0] == urls[0])
    with running(serve([urls[0].replace(urls[0].rsplit(":", 1)[1], "9"), urls[1]], port=0)) as broken:
        status, _, replica = call(f"http://127.0.0.1:{broken.server_port}", "/tokenize", {"text": text})
    assert status == 200 and replica == urls[1]
