"""Provenance (issue 22): the model's source (local content hash, hub commit, random seed), the
software versions and this checkout's commit, and the request, seeds and time of each answer —
in GET /model, in every job result, and in an answer asked with "provenance": true."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from explorer import __version__
from explorer.runtime import provenance
from explorer.runtime.loading import load_model, random_gpt2
from model_utils import Explorer
from tests.helpers import FACT, PAIR, TEXT, TINY, err, ok, wait_job

ROOT = Path(__file__).resolve().parent.parent


def test_model_info_carries_the_static_part(client, tiny_dir):
    info = ok(client.get("/model"))
    assert set(info["provenance"]) == {"model", "software"}
    model = info["provenance"]["model"]
    assert model["name"] == info["name"] and model["family"] == "gpt2"
    assert (model["dtype"], model["device"], model["device_map"]) == ("float32", "cpu", None)
    source = model["source"]
    assert source["kind"] == "local" and source["path"] == str(tiny_dir)
    assert source["files"] == sorted(p.name for p in tiny_dir.iterdir())  # config, tokenizer, weights
    software = info["provenance"]["software"]
    assert software["python"] == platform.python_version()
    for key, package in (("torch", "torch"), ("transformers", "transformers"),
                         ("transformer_lens", "transformer-lens")):
        assert software[key] == importlib.metadata.version(package)
    explorer = software["explorer"]
    assert explorer["version"] == __version__
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert explorer["commit"] == head.strip() and isinstance(explorer["modified"], bool)


def test_local_hash_changes_when_one_weight_changes(tmp_path):
    from transformers import GPT2LMHeadModel

    model = random_gpt2(str(tmp_path), seed=5, **TINY)
    model.save_pretrained(tmp_path)
    first = provenance.files_hash(str(tmp_path))
    assert load_model(str(tmp_path), device="cpu").source == {"kind": "local", "path": str(tmp_path), **first}
    assert provenance.files_hash(str(tmp_path)) == first  # the same files: the same hash
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 7] += 1e-3
    model.save_pretrained(tmp_path)
    changed = provenance.files_hash(str(tmp_path))
    assert changed["sha256"] != first["sha256"] and changed["files"] == first["files"]
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)  # the change is real, and only that one weight
    assert reloaded.transformer.h[1].mlp.c_fc.weight[3, 7] != 0


def test_local_hash_is_remembered_until_a_file_changes(tmp_path, monkeypatch):
    """A second hash of unchanged files reads none of them (the digest is kept under their path,
    size and modification time) and equals the first; a changed file is hashed again."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    first = provenance.files_hash(str(folder))
    assert (tmp_path / "cache" / "explorer" / "hashes.json").exists()
    real_open = open
    opened: list[str] = []
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    assert provenance.files_hash(str(folder)) == first and not opened
    (folder / "model.safetensors").write_bytes(b"other!!" * 1000)  # the same size, a new time
    stat = os.stat(folder / "model.safetensors")
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse clocks
    changed = provenance.files_hash(str(folder))
    assert changed["sha256"] != first["sha256"] and opened
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))  # nothing remembered: the same digest
    assert provenance.files_hash(str(folder)) == changed


@pytest.mark.slow  # builds GPT-2 small's shape
def test_random_model_records_its_seed():
    model = load_model(random_weights=True, seed=7, device="cpu")
    assert model.describe()["source"] == {"kind": "random", "seed": 7, "shape": "gpt2-small", "tokenizer": "gpt2"}


@pytest.mark.slow  # a fresh interpreter with its own Hugging Face cache
def test_hub_model_records_the_commit_it_loaded(tmp_path):
    """A hub model loaded offline from a Hugging Face cache laid out as the hub client leaves it:
    its source names the snapshot's commit (the main branch's, or a pinned revision)."""
    repo = tmp_path / "hub" / "models--explorer-test--tiny"
    commits = ["1" * 40, "2" * 40]
    for seed, commit in enumerate(commits):
        random_gpt2(str(repo / "snapshots" / commit), seed=seed, **TINY).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[1])
    script = ("import json; from explorer.runtime.loading import load_model; "
              "print(json.dumps([load_model('explorer-test/tiny', device='cpu', revision=r).describe()['source'] "
              f"for r in (None, {commits[0]!r})]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    main, pinned = json.loads(out.stdout.strip().splitlines()[-1])
    assert main == {"kind": "hub", "id": "explorer-test/tiny", "revision": commits[1], "requested_revision": None}
    assert pinned == {"kind": "hub", "id": "explorer-test/tiny", "revision": commits[0],
                      "requested_revision": commits[0]}


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def test_an_answer_asked_for_provenance_carries_it(client):
    body = {"text": FACT, "subject": "Eiffel Tower", "answer": " Paris", "samples": 2, "provenance": True}
    before = datetime.now(timezone.utc)
    stamped = ok(client.post("/causal_trace", json=body))
    after = datetime.now(timezone.utc)
    record = stamped.pop("provenance")
    assert record["endpoint"] == "/causal_trace" and record["request"] == body
    assert record["seeds"] == {"seed": 0}  # the default seed, recorded though the request left it out
    assert before <= _time(record["time"]) <= after
    assert record["model"] == ok(client.get("/model"))["provenance"]["model"]
    plain = ok(client.post("/causal_trace", json={k: v for k, v in body.items() if k != "provenance"}))
    assert "provenance" not in plain and plain == stamped  # the default answer is unchanged


def test_every_job_result_carries_it(client):
    body = {**PAIR, "site": "resid_pre", "async": True}
    r = client.post("/patch", json=body)
    assert r.status_code == 202
    result = wait_job(client, r.get_json()["job"])["result"]
    assert result["provenance"]["endpoint"] == "/patch" and result["provenance"]["request"] == body
    assert result["provenance"]["seeds"] == {}
    chg = {"texts": [TEXT], "targets": [" mat"], "steps": 1, "seed": 3}
    state = wait_job(client, client.post("/jobs/chg", json=chg).get_json()["job"])
    assert state["result"]["provenance"]["seeds"] == {"seed": 3}


def test_provenance_must_be_a_boolean(client):
    assert err(client.post("/predict", json={"text": TEXT, "token_index": 1, "provenance": "yes"})) == \
        "provenance must be true or false"


def test_the_facade_stamps_on_request(tiny_model):
    ex = Explorer(tiny_model)
    answer = ex.predict(TEXT, 2, 3, provenance=True)
    assert answer["provenance"]["request"] == {"text": TEXT, "token_index": 2, "top_k": 3, "provenance": True}
    assert "provenance" not in ex.predict(TEXT, 2, 3)


def test_openapi_documents_it(client):
    doc = ok(client.get("/openapi.json"))
    schemas = doc["components"]["schemas"]
    assert set(schemas["Provenance"]["properties"]) == {"model", "software", "endpoint", "request", "seeds", "time"}
    assert schemas["PredictResponse"]["properties"]["provenance"] == {"$ref": "#/components/schemas/Provenance"}
    assert "provenance" in schemas["ModelInfo"]["required"]
