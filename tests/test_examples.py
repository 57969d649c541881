"""examples/ (mock data for frontends) and API.md's curl examples still match the live contract."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from app import create_app
from explorer.operations import OPERATIONS
from explorer.web import openapi
from scripts.make_examples import EXAMPLES, JOB_EXAMPLES
from tests.helpers import wait_job

ROOT = Path(__file__).resolve().parent.parent
RESPONSES = {path: op.response for path, op in OPERATIONS.items() if op.mode != "job"}
RESPONSES.update({"/model": openapi.ModelInfo, "/models": openapi.ModelsResponse, "/saes": openapi.SaesResponse})
JOB_RESULTS = {path: op.response for path, op in OPERATIONS.items() if op.mode == "job"}

pytestmark = pytest.mark.slow  # every documented example and curl command, jobs included, end to end


@pytest.fixture(scope="module")
def demo_sae(tmp_path_factory) -> str:
    """The examples' SAE "demo" (scripts/make_examples.py) on the tiny model's width."""
    from model_utils import write_random_sae

    return str(write_random_sae(tmp_path_factory.mktemp("demo-sae"), d_in=64, d_sae=4096,
                                hook="blocks.1.hook_resid_pre", scale=0.3))


@pytest.fixture(scope="module")
def demo_lens(tmp_path_factory) -> str:
    """The examples' Jacobian lens "demo" (scripts/make_examples.py) on the tiny model's shape."""
    import torch
    from transformer_lens.tools.analysis import JacobianLens

    from explorer.runtime import jlens

    generator = torch.Generator().manual_seed(0)
    lens = JacobianLens({l: torch.eye(64) + 0.02 * torch.randn(64, 64, generator=generator) for l in range(2)},
                        n_prompts=1, d_model=64)
    return jlens.save(lens, str(tmp_path_factory.mktemp("demo-lens")), "demo")


@pytest.fixture()
def client(tiny_model, demo_sae, demo_lens, tmp_path):
    from explorer.runtime import jlens

    model = dataclasses.replace(tiny_model, lenses={})  # the session's model keeps none
    jlens.attach([model], [demo_lens])
    return create_app({"TESTING": True, "SAES": [f"name=demo,{demo_sae}"], "JLENS_DIR": str(tmp_path)},
                      model=model).test_client()


@pytest.mark.parametrize("name,path,body", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_matches_contract_and_records_its_model(client, name, path, body):
    data = json.loads((ROOT / "examples" / name).read_text())
    meta = data.pop("_example")
    assert meta["request"] == {"method": "GET" if body is None else "POST", "path": path, "body": body}
    assert meta["weights"] in {"random", "pretrained", "local"} and meta["model"]
    RESPONSES[path].model_validate(data)
    # the same request to today's server yields the same keys (a tiny model, so values differ)
    live = client.post(path, json=body) if body is not None else client.get(path)
    assert live.status_code == 200
    live = live.get_json()
    # A causal answer carries `warning` exactly when its recovery is null (clean and corrupt metrics
    # equal, as they can be on random weights), which depends on the model: compare the rest.
    for answer in (data, live):
        if "recovery" in answer:
            assert ("warning" in answer) == (answer["recovery"] is None)
    assert set(live) - {"warning"} == set(data) - {"warning"}


@pytest.mark.parametrize("name,path,body", JOB_EXAMPLES, ids=[e[0] for e in JOB_EXAMPLES])
def test_job_example_matches_contract(client, name, path, body):
    data = json.loads((ROOT / "examples" / name).read_text())
    meta = data.pop("_example")
    assert meta["request"] == {"method": "POST", "path": path, "body": body}
    status = openapi.JobStatus.model_validate(data)
    assert status.status == "done" and status.kind == path.rsplit("/", 1)[1]
    JOB_RESULTS[path].model_validate(status.result)
    live = client.post(path, json={**body, "steps": 1})  # the same request is still accepted
    assert live.status_code == 202
    state = wait_job(client, live.get_json()["job"])
    assert state["status"] == "done" and set(state["result"]) == set(status.result)


def curl_examples() -> list[tuple[str, str, dict | None, int]]:
    """(method, path, body, expected status) of every curl command in API.md."""
    text = (ROOT / "API.md").read_text()
    found = []
    for cmd in re.findall(r"^curl .*(?:\n  .*)*", text, flags=re.M):
        args = shlex.split(cmd.replace("\\\n", " "))
        url = next(a for a in args if a.startswith("http://"))
        body = json.loads(args[args.index("-d") + 1]) if "-d" in args else None
        status = int(m.group(1)) if (m := re.search(r"# expect (\d{3})", cmd)) else 200
        method = args[args.index("-X") + 1] if "-X" in args else ("POST" if body is not None else "GET")
        found.append((method, url.split("5001", 1)[1], body, status))
    return found


def test_api_md_has_a_curl_example_per_endpoint():
    paths = {p for _, p, _, _ in curl_examples()}
    documented = {"/openapi.json"} | set(OPERATIONS) | set(openapi.GETS) | {"/jobs/0123456789abcdef"}
    assert documented <= paths, documented - paths


@pytest.mark.parametrize("method,path,body,status", curl_examples())
def test_api_md_curl_examples_answer(client, method, path, body, status):
    r = client.open(path, method=method, json=body)
    assert r.status_code == status, r.data[:300]
    assert r.mimetype == ("text/event-stream" if (body or {}).get("stream") else "application/json")
    if status == 202:
        # Let the job finish here: the next test's app shares the model, and two apps' workers must
        # never run it at once (a leftover job's hooks would act on the other's forward passes).
        assert wait_job(client, r.get_json()["job"])["status"] == "done"
