"""Machine-checked contract: schemathesis fuzzes every operation of /openapi.json in-process
(no server errors, no schema violations, every error body JSON); hypothesis checks the
validators and the tokenizer round-trip on arbitrary unicode."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import schemathesis
from schemathesis import GenerationMode, checks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import create_app
from explorer.operations import OPERATIONS as REGISTERED
from explorer.runtime.jobs import JobManager
from explorer.web import openapi

FUZZ_CASES_PER_OPERATION = 100
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = pytest.mark.slow  # thousands of generated requests


class CancellingJobs(JobManager):
    """Remembers the jobs fuzzing starts (a valid /jobs/chg body may ask for thousands of steps)
    so that each test cancels what it left running."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list = []

    def start(self, *args):
        job = super().start(*args)
        self.started.append(job)
        return job


@pytest.fixture(scope="module")
def fuzz_app(tiny_model, tmp_path_factory):
    from model_utils import write_random_sae

    sae = write_random_sae(tmp_path_factory.mktemp("fuzz-sae"), d_in=64, d_sae=64, hook="blocks.1.hook_resid_pre",
                           architecture="topk", k=4, scale=0.3)
    app = create_app({"TESTING": True, "SAES": [f"name=fuzz,{sae}"], "JLENS_DIR": str(tmp_path_factory.mktemp("jlens"))},
                     model=dataclasses.replace(tiny_model, lenses={}))
    app.extensions["jobs"] = CancellingJobs()
    return app


@pytest.fixture(autouse=True)
def no_jobs_left_running(fuzz_app):
    yield
    for job in fuzz_app.extensions["jobs"].started:
        job.cancel()


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app)


FUZZ_COUNTS: dict[str, int] = {}


# schemathesis' pytest plugin does not support pytest 9, so its strategies drive hypothesis here.
# Every operation the document lists, so each new endpoint is fuzzed as soon as it is documented.
POSTS = [f"POST {path}" for path in REGISTERED]
GETS = [f"GET {path}" for path in openapi.GETS] + ["GET /jobs/{job_id}", "DELETE /jobs/{job_id}"]
OPERATIONS = [(op, GenerationMode.POSITIVE) for op in POSTS + GETS]
OPERATIONS += [(op, GenerationMode.NEGATIVE) for op in POSTS]  # GETs take only free strings (a job id, /model's name)


@pytest.mark.parametrize("operation,mode", OPERATIONS, ids=lambda v: getattr(v, "value", v))
def test_openapi_fuzz(api_schema, operation, mode):
    method, path = operation.split()
    op = api_schema[path][method]
    key = f"{operation} {mode.value}"
    FUZZ_COUNTS[key] = 0

    @settings(max_examples=FUZZ_CASES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def check(case) -> None:
        FUZZ_COUNTS[key] += 1
        # Index bounds depend on the text's token count, which JSON Schema cannot express, so a
        # schema-valid index may still be out of range (400): that one check does not apply.
        response = case.call_and_validate(excluded_checks=[checks.positive_data_acceptance])
        assert response.status_code < 500
        headers = {k.lower(): v for k, v in response.headers.items()}
        assert headers["content-type"][0].startswith("application/json")

    check()
    assert FUZZ_COUNTS[key] > 0
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz-counts.json").write_text(json.dumps(FUZZ_COUNTS, indent=1))


def test_openapi_document_covers_every_route(fuzz_app):
    spec = fuzz_app.test_client().get("/openapi.json").get_json()
    routes = {r.rule.replace("<job_id>", "{job_id}") for r in fuzz_app.url_map.iter_rules()}
    routes -= {"/openapi.json", "/static/<path:filename>", "/"}
    assert routes <= set(spec["paths"]), routes - set(spec["paths"])
    layer = spec["components"]["schemas"]["AttentionRequest"]["properties"]["layer"]
    assert layer["maximum"] == fuzz_app.extensions["explorer"].model.cfg.n_layers - 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


# Every field any endpoint takes ("async" aside: jobs would pile up), plus one none takes.
FIELDS = sorted({f.alias or name for op in REGISTERED.values() for name, f in op.request.model_fields.items()}
                - {"async"} | {"other"})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=5),
       path=st.sampled_from(list(REGISTERED)))
def test_any_json_object_gets_200_or_json_400(fuzz_app, body, path):
    r = fuzz_app.test_client().post(path, json=body)
    # a path that always starts a job answers 202, or 503 when too many are running
    allowed = (202, 400, 503) if REGISTERED[path].mode == "job" else (200, 400)
    assert r.status_code in allowed, (r.status_code, r.data[:200])
    data = r.get_json()
    assert ("error" in data) == (r.status_code >= 400)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(min_size=1, max_size=40))
def test_tokenizer_round_trip_arbitrary_unicode(fuzz_app, text):
    r = fuzz_app.test_client().post("/tokenize", json={"text": text})
    assert r.status_code in (200, 400)
    if r.status_code == 400:  # only possible reason: more tokens than n_ctx
        assert "n_ctx" in r.get_json()["error"]
        return
    tokens = r.get_json()["tokens"]
    tok = fuzz_app.extensions["explorer"].model.tokenizer
    assert tokens[0]["token_id"] == tok.bos_token_id
    assert tok.decode([t["token_id"] for t in tokens[1:]]) == text


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_500(fuzz_app, raw):
    r = fuzz_app.test_client().post("/predict", data=raw, content_type="application/json")
    assert r.status_code in (200, 400) and r.is_json
