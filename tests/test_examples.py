"""examples/ (mock data for frontends) and API.md's curl examples still match the live contract."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from explorer import openapi, schemas
from scripts.make_examples import EXAMPLES

ROOT = Path(__file__).resolve().parent.parent
RESPONSES = {"/tokenize": schemas.TokenizeResponse, "/trace": schemas.TraceResponse,
             "/predict": schemas.PredictResponse, "/attention": schemas.AttentionResponse,
             "/model": schemas.ModelInfo}
RESPONSES.update({path: openapi.POSTS[path][1] for path in ("/lens", "/score", "/dla")})


@pytest.mark.parametrize("name,path,body", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_matches_contract_and_records_its_model(client, name, path, body):
    data = json.loads((ROOT / "examples" / name).read_text())
    meta = data.pop("_example")
    assert meta["request"] == {"method": "GET" if body is None else "POST", "path": path, "body": body}
    assert meta["weights"] in {"random", "pretrained"} and meta["model"]
    RESPONSES[path].model_validate(data)
    # the same request to today's server yields the same keys (a tiny model, so values differ)
    live = client.post(path, json=body) if body is not None else client.get(path)
    assert live.status_code == 200
    assert set(live.get_json()) == set(data)


def curl_examples() -> list[tuple[str, str, dict | None, int]]:
    """(method, path, body, expected status) of every curl command in API.md."""
    text = (ROOT / "API.md").read_text()
    found = []
    for cmd in re.findall(r"^curl .*(?:\n  .*)*", text, flags=re.M):
        args = shlex.split(cmd.replace("\\\n", " "))
        url = next(a for a in args if a.startswith("http://"))
        body = json.loads(args[args.index("-d") + 1]) if "-d" in args else None
        status = int(m.group(1)) if (m := re.search(r"# expect (\d{3})", cmd)) else 200
        found.append(("POST" if body is not None else "GET", url.split("5001", 1)[1], body, status))
    return found


def test_api_md_has_a_curl_example_per_endpoint():
    paths = {p for _, p, _, _ in curl_examples()}
    assert {"/tokenize", "/trace", "/attention", "/predict", "/model", "/health", "/openapi.json"} <= paths


@pytest.mark.parametrize("method,path,body,status", curl_examples())
def test_api_md_curl_examples_answer(client, method, path, body, status):
    r = client.open(path, method=method, json=body)
    assert r.status_code == status, r.data[:300]
    assert r.is_json
