"""Several models in one server: the "model" field routes every endpoint, each model has its own
worker (a slow request on one never blocks another), and one cache bound covers them all."""
from __future__ import annotations

import threading
import time
import pytest

from explorer.web import server as app_module
from app import create_app, parse_args
from tests.helpers import EVERY_ENDPOINT, TEXT, answer, assert_same_answer


@pytest.fixture()
def two(tiny_model, other_model):
    return create_app({"TESTING": True}, model={"a": tiny_model, "b": other_model})


def test_model_field_routes_every_endpoint(two, tiny_model, other_model):
    both = two.test_client()
    alone = {"a": create_app({"TESTING": True}, model=tiny_model).test_client(),
             "b": create_app({"TESTING": True}, model=other_model).test_client()}
    differ = 0
    for path, body in EVERY_ENDPOINT:
        want = {name: answer(client, path, body) for name, client in alone.items()}
        assert_same_answer(answer(both, path, body), want["a"])  # no "model": the default
        assert_same_answer(answer(both, path, {**body, "model": "a"}), want["a"])
        assert_same_answer(answer(both, path, {**body, "model": "b"}), want["b"])
        differ += want["a"] != want["b"]
    assert differ >= len(EVERY_ENDPOINT) - 1  # only /tokenize is weight-free: routing is visible


def test_unknown_model_is_400_everywhere(two):
    client = two.test_client()
    for path, body in EVERY_ENDPOINT:
        r = client.post(path, json={**body, "model": "c"})
        assert r.status_code == 400, path
        assert r.get_json()["error"] == "model 'c' is not loaded; loaded models: 'a', 'b'"
    r = client.post("/patch", json={**EVERY_ENDPOINT[8][1], "model": "c", "async": True})
    assert r.status_code == 400
    assert client.get("/model?model=c").status_code == 400
    assert client.post("/tokenize", json={"text": TEXT, "model": 3}).status_code == 400


def test_models_model_and_health(two, tiny_model, other_model):
    client = two.test_client()
    listed = client.get("/models").get_json()
    assert listed["default"] == "a" and [m["name"] for m in listed["models"]] == ["a", "b"]
    assert client.get("/model").get_json() == listed["models"][0] == client.get("/model?model=a").get_json()
    assert client.get("/model?model=b").get_json() == listed["models"][1]
    info = other_model.info()
    info["provenance"]["model"]["name"] = info["name"] = "b"
    assert listed["models"][1] == {**info, "lenses_available": [], "saes": []}
    client.post("/predict", json={"text": TEXT, "token_index": 2, "model": "b"})
    health = client.get("/health").get_json()
    assert health["model"] == "a" and set(health["models"]) == {"a", "b"}
    assert health["models"]["b"]["cache"]["entries"] >= 1 and health["models"]["a"]["cache"]["entries"] == 0
    assert health["cache"] == health["models"]["a"]["cache"]
    single = create_app({"TESTING": True}, model=tiny_model).test_client().get("/health").get_json()
    assert "models" not in single  # one model: the original answer


def hold(app, name: str) -> threading.Event:
    """Block `name`'s worker until the returned event is set (a long request on that model)."""
    release, started = threading.Event(), threading.Event()
    app.extensions["models"].get(name).worker.submit(lambda: (started.set(), release.wait(30)))
    assert started.wait(5)
    return release


def test_a_busy_model_does_not_block_another(two):
    client = two.test_client()
    release = hold(two, "a")
    try:
        done: list[int] = []
        waiting = threading.Thread(target=lambda: done.append(
            client.post("/predict", json={"text": TEXT, "token_index": 1, "model": "a"}).status_code))
        waiting.start()
        start = time.monotonic()
        r = client.post("/predict", json={"text": TEXT, "token_index": 1, "model": "b"})
        assert r.status_code == 200 and time.monotonic() - start < 10
        path, body = EVERY_ENDPOINT[-1]  # a job (CHG) on b runs on b's worker to its end
        assert answer(client, path, {**body, "model": "b"})["steps"] == body["steps"]
        assert not done  # a's request still waits behind a's long work
    finally:
        release.set()
    waiting.join(30)
    assert done == [200]


def test_one_cache_bound_for_all_models(tiny_model, other_model):
    texts = [f"Text number {i} about cats and mats" for i in range(6)]
    probe = create_app({"TESTING": True}, model=tiny_model)
    probe.test_client().post("/attention", json={"text": texts[0], "layer": 0, "head": 0})
    one_run = probe.extensions["explorer"].cache.stats()["bytes"]
    bound = int(one_run * 4.5)  # room for four runs of these (equally long) texts in all
    app = create_app({"TESTING": True, "CACHE_BYTES": bound}, model={"a": tiny_model, "b": other_model})
    client, models = app.test_client(), app.extensions["models"]
    a, b = models.get("a").cache, models.get("b").cache
    for text in texts[:4]:
        client.post("/attention", json={"text": text, "layer": 0, "head": 0, "model": "a"})
    assert a.stats()["entries"] == 4 and a.stats()["bytes"] == 4 * one_run
    for text in texts[:3]:  # b's runs evict a's least recently used ones
        client.post("/attention", json={"text": text, "layer": 0, "head": 0, "model": "b"})
        total = a.stats()["bytes"] + b.stats()["bytes"]
        assert total <= bound and a.stats()["max_bytes"] == b.stats()["max_bytes"] == bound
    assert (a.stats()["entries"], b.stats()["entries"]) == (1, 3)
    assert a.get(("run", texts[3])) is not None and a.get(("run", texts[0])) is None  # LRU across models
    b.clear()
    assert b.stats()["bytes"] == 0 and a.budget.bytes == a.stats()["bytes"]


def test_command_line_several_models(monkeypatch):
    assert parse_args(["--model", "gpt2", "--model", "EleutherAI/pythia-70m"]).model == ["gpt2", "EleutherAI/pythia-70m"]
    monkeypatch.setenv("EXPLORER_MODEL", "gpt2, ./local")
    assert parse_args([]).model == ["gpt2", "./local"]
    assert parse_args(["--model", "x"]).model == ["x"]  # the flag wins over the environment
    with pytest.raises(SystemExit):
        parse_args(["--model", "gpt2", "--model", "gpt2"])
    seen: list[tuple] = []
    monkeypatch.setattr(app_module, "load_model", lambda name, **kw: seen.append((name, kw["seed"])))
    app_module.load_models(["m0", "m1"], {**app_module.DEFAULTS, "RANDOM_WEIGHTS": True})
    assert seen == [("m0", 0), ("m1", 1)]  # random weights: model i gets seed i


def test_one_model_in_two_apps_runs_one_job_at_a_time(tiny_model):
    """The bridge is not thread-safe: explorers sharing a model (a renamed copy, several apps)
    share its lock, so their workers never run it at once."""
    first = create_app({"TESTING": True}, model=tiny_model)
    second = create_app({"TESTING": True}, model={"renamed": tiny_model})
    release = hold(first, tiny_model.name)
    done: list[int] = []
    waiting = threading.Thread(target=lambda: done.append(second.test_client().post(
        "/predict", json={"text": "Shared model, one lock", "token_index": 1}).status_code))
    waiting.start()
    waiting.join(1.0)
    assert not done  # the second app's worker waits for the first app's job
    release.set()
    waiting.join(30)
    assert done == [200]
