"""Every endpoint through Flask's test client: contract shapes and every error case."""
from __future__ import annotations

import pytest

from tests.helpers import TEXT

LONG = "word " * 200  # > 64 tokens, the tiny model's n_ctx


def test_model_and_health(client, tiny_model):
    info = client.get("/model")
    assert info.status_code == 200
    cfg = tiny_model.cfg
    body = info.get_json()
    assert {k: body[k] for k in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx")} == {
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx}
    assert body["weights"] == "local" and body["device"] == "cpu"  # a save_pretrained directory
    assert body["dtype"] == "float32" and isinstance(body["name"], str)
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "ok"


def test_contract_shapes(client, tiny_model):
    toks = client.post("/tokenize", json={"text": TEXT}).get_json()["tokens"]
    assert toks[0] == {"index": 0, "token_id": 50256, "token_str": "<|endoftext|>"}
    assert toks[1] == {"index": 1, "token_id": 464, "token_str": "The"}
    trace = client.post("/trace", json={"text": TEXT, "token_indices": [1, 4]}).get_json()
    assert trace["tokens"] == [{"index": 1, "token_str": "The"}, {"index": 4, "token_str": " on"}]
    assert set(trace["trajectories"]) == {"1", "4"}
    assert all(set(p) == {"layer", "x", "y"} for p in trace["trajectories"]["4"])
    assert len(trace["pca_explained_variance"]) == 2
    att = client.post("/attention", json={"text": TEXT, "layer": 0, "head": 1}).get_json()
    assert len(att["attention_matrix"]) == len(toks) and att["tokens"][1] == "The"
    assert (att["n_heads"], att["n_layers"]) == (tiny_model.cfg.n_heads, tiny_model.cfg.n_layers)
    att_null = client.post("/attention", json={"text": TEXT, "layer": 0, "head": None}).get_json()
    assert len(att_null["attention_matrix"]) == tiny_model.cfg.n_heads
    pred = client.post("/predict", json={"text": TEXT, "token_index": 5}).get_json()
    assert pred["token_index"] == 5 and len(pred["predictions_by_layer"]) == tiny_model.cfg.n_layers
    assert all(len(l["top_tokens"]) == 5 for l in pred["predictions_by_layer"])  # default top_k
    assert set(pred["predictions_by_layer"][0]["top_tokens"][0]) >= {"token", "probability"}


def test_endpoints_share_one_forward_pass(app, client, calls):
    forwards = calls["forward"]
    cache = app.extensions["explorer"].cache
    text = "A text no other test uses, for counting forward passes."
    client.post("/attention", json={"text": text, "layer": 0})
    assert len(forwards) == 1
    before = cache.stats()["computations"]
    for layer in range(3):
        for head in range(4):
            assert client.post("/attention", json={"text": text, "layer": layer, "head": head}).status_code == 200
    assert client.post("/trace", json={"text": text}).status_code == 200
    assert client.post("/predict", json={"text": text, "token_index": 2}).status_code == 200
    assert client.post("/predict", json={"text": text, "token_index": 2, "top_k": 7}).status_code == 200
    # no further forward pass; one trace PCA and one lens projection for position 2 (shared by
    # both top_k values)
    assert len(forwards) == 1
    assert cache.stats()["computations"] == before + 2


def err(resp, status: int) -> str:
    assert resp.status_code == status, resp.data
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


@pytest.mark.parametrize("path,body,needle", [
    ("/tokenize", {}, "give either text or token_ids, not both and not neither"),
    ("/tokenize", {"text": "a", "token_ids": [1]}, "give either text or token_ids"),
    ("/predict", {"token_ids": [1, 99999], "token_index": 0}, "token_ids[] must be token ids between 0 and 50256, got 99999"),
    ("/attention", {"token_ids": [], "layer": 0}, "token_ids must hold between 1 and 64 (n_ctx) token ids, got 0"),
    ("/tokenize", {"text": ""}, "text must be a non-empty string"),
    ("/tokenize", {"text": 5}, "text must be a string"),
    ("/tokenize", {"text": None}, "give either text or token_ids"),  # null: as if left out
    ("/tokenize", {"text": LONG}, "at most 64"),
    ("/tokenize", {"text": "hi", "extra": 1}, "unknown field 'extra'"),
    ("/trace", {"text": TEXT, "token_indices": [1, 99]}, "token_indices[] must be between 0 and 6"),
    ("/trace", {"text": TEXT, "token_indices": [-1]}, "between 0 and 6"),
    ("/trace", {"text": TEXT, "token_indices": []}, "must not be empty"),
    ("/trace", {"text": TEXT, "token_indices": [2, 2]}, "duplicates"),
    ("/trace", {"text": TEXT, "token_indices": "1,2"}, "token_indices must be a list of integers"),
    ("/trace", {"text": TEXT, "token_indices": [1.5]}, "token_indices[] must be an integer"),
    ("/trace", {"text": LONG}, "at most 64"),
    ("/attention", {"text": TEXT}, "layer is required"),
    ("/attention", {"text": TEXT, "layer": 3}, "layer must be between 0 and 2, got 3"),
    ("/attention", {"text": TEXT, "layer": -1}, "layer must be between 0 and 2"),
    ("/attention", {"text": TEXT, "layer": 0, "head": 4}, "head must be between 0 and 3, got 4"),
    ("/attention", {"text": TEXT, "layer": True}, "layer must be an integer"),
    ("/attention", {"text": TEXT, "layer": "1"}, "layer must be an integer"),
    ("/attention", {"text": TEXT, "layer": 1.0}, "layer must be an integer"),
    ("/attention", {"text": TEXT, "layer": 0, "head": 3.5}, "head must be an integer"),
    ("/predict", {"text": TEXT}, "token_index is required"),
    ("/predict", {"text": TEXT, "token_index": 7}, "token_index must be between 0 and 6, got 7"),
    ("/predict", {"text": TEXT, "token_index": 1, "top_k": 0}, "top_k must be between 1 and 100"),
    ("/predict", {"text": TEXT, "token_index": 1, "top_k": 101}, "top_k must be between 1 and 100"),
    ("/predict", {"text": TEXT, "token_index": 1, "top_k": None}, "top_k must be an integer"),
    ("/predict", {"text": "", "token_index": 0}, "text must be a non-empty string"),
])
def test_bad_requests_get_400_naming_the_field(client, path, body, needle):
    assert needle in err(client.post(path, json=body), 400)


@pytest.mark.parametrize("raw", [b"{bad json", b'{"text": NaN}', b'{"text": "\\ud800"}', b"[" * 5000,
                                 b'{"text": "x"', b"", b"\xff\xfe", b'"just a string"', b"[1, 2]", b"null"])
def test_malformed_bodies_get_400(client, raw):
    err(client.post("/tokenize", data=raw, content_type="application/json"), 400)


def test_wrong_content_type_gets_415(client):
    assert "application/json" in err(client.post("/tokenize", data='{"text": "hi"}', content_type="text/plain"), 415)
    err(client.post("/tokenize", data="text=hi"), 415)


def test_body_too_large_gets_413(client, app):
    big = b'{"text": "' + b"a" * (app.config["MAX_CONTENT_LENGTH"] + 10) + b'"}'
    err(client.post("/tokenize", data=big, content_type="application/json"), 413)


def test_404_and_405_are_json(client):
    assert "/nope" in err(client.get("/nope"), 404)
    err(client.get("/predict"), 405)
    err(client.post("/health", json={}), 405)


def test_response_size_limit_refuses_before_building(tiny_model):
    from app import create_app

    small = create_app({"MAX_RESPONSE_BYTES": 1000}, model=tiny_model).test_client()
    msg = err(small.post("/attention", json={"text": TEXT * 3, "layer": 0}), 400)
    assert "one head" in msg
    assert small.post("/attention", json={"text": TEXT, "layer": 0, "head": 0}).status_code == 200


def test_cors_defaults(client):
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://localhost", "null"):
        r = client.post("/tokenize", json={"text": "hi"}, headers={"Origin": origin})
        assert r.status_code == 200
        assert r.headers.get("Access-Control-Allow-Origin") == origin
        assert "Access-Control-Allow-Credentials" not in r.headers
    for origin in ("http://evil.example", "http://localhost.evil.example", "https://127.0.0.1.nip.io"):
        r = client.post("/tokenize", json={"text": "hi"}, headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in r.headers
    pre = client.options("/predict", headers={"Origin": "http://localhost:5173",
                                              "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "content-type"})
    assert pre.headers.get("Access-Control-Allow-Origin") == "http://localhost:5173"


def test_cors_origins_configurable(tiny_model):
    from app import create_app

    c = create_app({"CORS_ORIGINS": ["https://viz.example"]}, model=tiny_model).test_client()
    ok = c.post("/tokenize", json={"text": "hi"}, headers={"Origin": "https://viz.example"})
    assert ok.headers.get("Access-Control-Allow-Origin") == "https://viz.example"
    no = c.post("/tokenize", json={"text": "hi"}, headers={"Origin": "http://localhost:3000"})
    assert "Access-Control-Allow-Origin" not in no.headers


@pytest.mark.parametrize("host", ["localhost", "localhost:5001", "127.0.0.1:5001", "[::1]:5001"])
def test_loopback_host_headers_accepted(client, host):
    assert client.get("/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:5001", "localhost.evil.example", "10.0.0.5:5001"])
def test_foreign_host_headers_rejected(client, host):
    assert "Host" in err(client.get("/health", headers={"Host": host}), 400)


def test_host_check_off_for_public_bind(tiny_model):
    from app import create_app

    c = create_app({"CHECK_HOST": False}, model=tiny_model).test_client()
    assert c.get("/health", headers={"Host": "myserver.example"}).status_code == 200
