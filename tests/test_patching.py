"""/patch and /causal_trace against an independent implementation: plain HF transformers with
forward hooks (tests/helpers.py's HFPatcher: one forward per cell, no TransformerLens, none of the
project's code), and against `transformer_lens.patching`; the causal-tracing invariants; every
400; jobs."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from tests.helpers import (CLEAN, CORRUPT, FACT, PAIR, HFPatcher, block_outputs, err, grid_shape, ids_of, ok,
                           unstamped, wait_job)

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching draws a bar per sweep otherwise

def logit_diff(answer: int, distractor: int):
    return lambda logits: logits[answer] - logits[distractor]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position"])
def test_patch_grid_matches_independent_hf_hooks(client, hf_patcher, tiny_model, site, direction):
    body = ok(client.post("/patch", json={**PAIR, "site": site, "direction": direction}))
    clean_ids, corrupt_ids = ids_of(client, CLEAN), ids_of(client, CORRUPT)
    base, source = (corrupt_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupt_ids)
    metric = logit_diff(body["answer"]["token_id"], body["distractor"]["token_id"])
    want = hf_patcher.grid(site, base, hf_patcher.capture(source), metric)
    got = np.array(body["effect"])
    cfg = tiny_model.cfg
    assert got.shape == want.shape == grid_shape(site, cfg, len(base))
    np.testing.assert_allclose(got, want, atol=1e-4)
    with torch.inference_mode():
        clean_logits = hf_patcher.model(torch.tensor([clean_ids])).logits[0, -1]
        corrupt_logits = hf_patcher.model(torch.tensor([corrupt_ids])).logits[0, -1]
    assert body["clean_metric"] == pytest.approx(float(metric(clean_logits)), abs=1e-4)
    assert body["corrupt_metric"] == pytest.approx(float(metric(corrupt_logits)), abs=1e-4)
    expected = (got - body["corrupt_metric"]) / (body["clean_metric"] - body["corrupt_metric"])
    np.testing.assert_allclose(np.array(body["recovery"]), expected, rtol=1e-4, atol=1e-4)
    assert body["metric"] == "logit_diff" and body["site"] == site and body["direction"] == direction
    assert len(body["rows"]) == cfg.n_layers
    assert len(body["columns"]) == (cfg.n_heads if site.startswith("heads") else len(base))


def test_patch_without_distractor_uses_logprob(client, hf_patcher):
    body = ok(client.post("/patch", json={**PAIR, "distractor": None, "site": "resid_pre"}))
    assert body["metric"] == "logprob" and body["distractor"] is None
    answer = body["answer"]["token_id"]
    want = hf_patcher.grid("resid_pre", ids_of(client, CORRUPT), hf_patcher.capture(ids_of(client, CLEAN)),
                           lambda logits: logits.log_softmax(-1)[answer])
    np.testing.assert_allclose(np.array(body["effect"]), want, atol=1e-4)


TL_FUNCTIONS = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
                "mlp_out": "get_act_patch_mlp_out", "heads": "get_act_patch_attn_head_out_all_pos",
                "heads_by_position": "get_act_patch_attn_head_out_by_pos"}


@pytest.mark.parametrize("site", list(TL_FUNCTIONS))
def test_patch_grid_matches_transformer_lens_patching(client, tiny_model, site):
    from transformer_lens import patching as tl_patching

    body = ok(client.post("/patch", json={**PAIR, "site": site}))
    answer, distractor = body["answer"]["token_id"], body["distractor"]["token_id"]
    bridge = tiny_model.bridge
    with torch.inference_mode():
        _, clean_cache = bridge.run_with_cache(torch.tensor([ids_of(client, CLEAN)]))
        want = getattr(tl_patching, TL_FUNCTIONS[site])(
            bridge, torch.tensor([ids_of(client, CORRUPT)]), clean_cache,
            lambda logits: logits[0, -1, answer] - logits[0, -1, distractor])
    if site == "heads_by_position":
        want = want.permute(0, 2, 1)  # the library's [layer, pos, head] -> ours [layer, head, pos]
    np.testing.assert_allclose(np.array(body["effect"]), want.numpy(), atol=1e-4)


def test_identical_prompts_give_null_recovery_with_warning(client):
    body = ok(client.post("/patch", json={**PAIR, "corrupt": CLEAN, "site": "heads"}))
    assert body["recovery"] is None and "undefined" in body["warning"]
    assert body["clean_metric"] == body["corrupt_metric"]
    assert np.all(np.array(body["effect"]) == body["clean_metric"])  # every patch is a no-op
    assert body["cells_computed"] == 0


def test_second_site_reuses_the_cached_runs(client, monkeypatch):
    from explorer.math import replay

    captured = []
    real = replay.capture
    monkeypatch.setattr(replay, "capture", lambda *a: captured.append(a[1]) or real(*a))
    pair = {**PAIR, "clean": CLEAN + " her", "corrupt": CORRUPT + " her"}
    ok(client.post("/patch", json={**pair, "site": "resid_pre"}))
    ok(client.post("/patch", json={**pair, "site": "heads", "direction": "noise"}))
    assert len(captured) == 2  # one forward per prompt, shared by both sites and directions


@pytest.mark.parametrize("change,needle", [
    ({"answer": " Mary Ann"}, "answer ' Mary Ann' is 2 tokens (' Mary', ' Ann')"),
    ({"distractor": " John Smith"}, "distractor ' John Smith' is 2 tokens"),
    ({"answer": 10**6}, "answer must be a token id between 0 and"),
    ({"answer": -1}, "answer must be a token id between 0 and"),
    ({"answer": ""}, "answer must be a non-empty string or a token id"),
    ({"distractor": " Mary"}, "answer and distractor are the same token"),
    ({"answer": 1.5}, "answer must be a string or an integer"),
    ({"corrupt": "When Mary went"}, "clean has 15, corrupt has 4"),
    ({"corrupt": CORRUPT + " her"}, "clean has 15, corrupt has 16 (special tokens included); they first "
                                    "differ at position 10 (clean ' John', corrupt ' Mary')"),
    ({"site": "neurons"}, "site must be one of 'resid_pre', 'attn_out', 'mlp_out', 'heads', 'heads_by_position'"),
    ({"direction": "sideways"}, "direction must be one of 'denoise', 'noise'"),
    ({"async": "yes"}, "async must be true or false"),
    ({"clean": ""}, "clean must be a non-empty string"),
    ({"model": "gpt-5"}, "model 'gpt-5' is not loaded"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_patch_bad_requests(client, change, needle):
    assert needle in err(client.post("/patch", json={**PAIR, "site": "resid_pre", **change}))


def test_patch_without_site_is_refused(client):
    assert err(client.post("/patch", json=PAIR)) == "site is required"


# --- causal tracing ---------------------------------------------------------------------------
# The default tiny model's outputs are nearly uniform (top-1 p ~ 5e-5), so noise moves P(answer)
# by less than recovery's 1e-6 threshold; tracing is tested on one with larger weights (top-1 ~ 0.08).

def trace(client, **fields) -> dict:
    return ok(client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", **fields}))


@pytest.mark.parametrize("kind", ["resid", "mlp", "attn"])
def test_causal_trace_invariants(peaked, tiny_model, kind):
    client = peaked[0]
    body = trace(client, kind=kind, samples=4)
    scores = np.array(body["scores"])
    tokens = body["tokens"]
    assert scores.shape == (tiny_model.cfg.n_layers, len(tokens))
    first = body["subject_positions"][0]
    assert [tokens[p] for p in body["subject_positions"]] == [" E", "iff", "el", " Tower"]
    # before the subject, nothing the noise touched: restoring changes nothing
    assert np.all(scores[:, :first] == body["corrupt_prob"])
    if kind == "resid":  # the last layer's residual at the last position is the whole clean output
        assert scores[-1, -1] == pytest.approx(body["clean_prob"], rel=1e-5)
    assert body["window"] == (None if kind == "resid" else tiny_model.cfg.n_layers)
    rec = np.array(body["recovery"])
    np.testing.assert_allclose(rec, (scores - body["corrupt_prob"]) / (body["clean_prob"] - body["corrupt_prob"]),
                               rtol=1e-4, atol=1e-4)


def test_causal_trace_same_seed_same_bits_other_seed_differs(peaked):
    client = peaked[0]
    a = client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "kind": "mlp", "seed": 3})
    b = client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "kind": "mlp", "seed": 3})
    assert a.status_code == b.status_code == 200 and a.data == b.data
    c = trace(client, kind="mlp", seed=4)
    assert c["corrupt_prob"] != a.get_json()["corrupt_prob"]


def test_causal_trace_default_answer_and_noise(peaked, tiny_model):
    client, hf_model = peaked
    body = trace(client, samples=2)
    ids = ids_of(client, FACT)
    with torch.inference_mode():
        probs = hf_model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    assert body["answer"]["token_id"] == int(probs.argmax())
    assert body["clean_prob"] == pytest.approx(float(probs.max()), rel=1e-4)
    w_e = hf_model.transformer.wte.weight.detach().double()
    assert body["noise"] == pytest.approx(3 * float(w_e.std(unbiased=False)), rel=1e-6)


@pytest.mark.parametrize("kind", ["resid", "mlp"])
def test_causal_trace_matches_independent_hf_noise_and_restore(peaked, kind):
    client, hf_model = peaked
    """Sampled cells recomputed with HF hooks from the documented noise recipe."""
    samples, seed, noise, window = 3, 7, 0.5, 2
    body = trace(client, kind=kind, samples=samples, seed=seed, noise=noise, window=window, answer=" Paris")
    ids = ids_of(client, FACT)
    positions = body["subject_positions"]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, len(positions), hf_model.config.n_embd, generator=g) * noise
    blocks = hf_model.transformer.h
    clean = HFPatcher(hf_model).capture(ids)
    with block_outputs(blocks) as clean_out, torch.inference_mode():  # each block's output on the clean prompt
        hf_model(torch.tensor([ids]))
    answer = body["answer"]["token_id"]
    n_layers = len(blocks)

    def prob(layer: int, pos: int) -> float:
        def add_noise(m, args):
            hidden = args[0].clone()
            hidden[:, positions] += draws
            return (hidden,) + args[1:]

        handles = [blocks[0].register_forward_pre_hook(add_noise)]
        if kind == "resid":
            def restore(m, args, out):
                first = out[0] if isinstance(out, tuple) else out
                first = first.clone()
                first[:, pos] = clean_out[layer][0, pos]
                return (first,) + out[1:] if isinstance(out, tuple) else first
            handles.append(blocks[layer].register_forward_hook(restore))
        else:
            for k in range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2))):
                def restore(m, args, out, k=k):
                    out = out.clone()
                    out[:, pos] = clean["mlp_out"][k][pos]
                    return out
                handles.append(blocks[k].mlp.register_forward_hook(restore))
        try:
            with torch.inference_mode():
                logits = hf_model(torch.tensor([ids] * samples)).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return float(logits.softmax(-1)[:, answer].mean())

    scores = np.array(body["scores"])
    for layer in range(n_layers):
        for pos in (positions[0], positions[-1], len(ids) - 1):
            assert scores[layer, pos] == pytest.approx(prob(layer, pos), rel=1e-4, abs=1e-9)


def test_causal_trace_subject_as_positions_equals_substring(peaked):
    client = peaked[0]
    by_text = trace(client, samples=2)
    by_pos = ok(client.post("/causal_trace", json={"text": FACT, "subject": by_text["subject_positions"], "samples": 2}))
    assert by_pos["scores"] == by_text["scores"]


@pytest.mark.parametrize("change,needle", [
    ({"subject": "Louvre"}, "subject 'Louvre' occurs 0 times in text"),
    ({"subject": "e"}, "occurs 4 times"),
    ({"subject": ""}, "subject must be a non-empty substring"),
    ({"subject": []}, "subject must not be an empty list"),
    ({"subject": [2, 2]}, "duplicate"),
    ({"subject": [99]}, "subject[] must be between 0 and 10, got 99"),
    ({"subject": 3}, "subject must be a string or a list of integers"),
    ({"samples": 0}, "samples must be between 1 and 50"),
    ({"samples": 51}, "samples must be between 1 and 50"),
    ({"noise": -1.0}, "noise must be a positive number"),
    ({"noise": 0}, "noise must be a positive number"),
    ({"window": 0}, "window must be between 1 and 3"),
    ({"window": 4}, "window must be between 1 and 3"),
    ({"seed": -1}, "seed must be between 0"),
    ({"kind": "heads"}, "kind must be one of 'resid', 'mlp', 'attn'"),
    ({"answer": " Paris Texas"}, "answer ' Paris Texas' is 2 tokens"),
])
def test_causal_trace_bad_requests(client, change, needle):
    body = {"text": FACT, "subject": "Eiffel Tower", **change}
    assert needle in err(client.post("/causal_trace", json=body))


# --- jobs ------------------------------------------------------------------------------------

@pytest.fixture()
def one_row_chunks(monkeypatch):
    """Chunks of one cell each, so a sweep of the tiny model spans many worker jobs."""
    from explorer.math import replay

    monkeypatch.setattr(replay, "budget", lambda *a: replay.Budget(1, float("inf")))


def test_async_patch_returns_a_job_with_progress_and_the_same_result(client, one_row_chunks):
    sync = ok(client.post("/patch", json={**PAIR, "site": "heads"}))
    r = client.post("/patch", json={**PAIR, "site": "heads", "async": True})
    assert r.status_code == 202 and set(r.get_json()) == {"job"}
    job = r.get_json()["job"]
    assert r.headers["Location"] == f"/jobs/{job}"
    seen = []
    while (state := ok(client.get(f"/jobs/{job}")))["status"] not in ("done", "error"):
        seen.append(state["progress"])
        time.sleep(0.005)
    assert state["status"] == "done" and state["progress"] == 1 and state["kind"] == "patch"
    assert unstamped(state["result"]) == sync
    assert seen == sorted(seen) and all(0 <= p <= 1 for p in seen)


def test_async_causal_trace(peaked):
    client = peaked[0]
    r = client.post("/causal_trace", json={"text": FACT, "subject": "Eiffel Tower", "samples": 2, "async": True})
    assert r.status_code == 202
    state = wait_job(client, r.get_json()["job"])
    assert state["status"] == "done" and unstamped(state["result"]) == trace(client, samples=2)


def test_bad_async_request_is_refused_before_any_job(client):
    r = client.post("/patch", json={**PAIR, "answer": " Mary Ann", "site": "heads", "async": True})
    assert r.status_code == 400


def test_cancel_stops_a_job_between_chunks(client, one_row_chunks, monkeypatch):
    from explorer.math import replay

    runs = []
    real = replay.run_rows
    gate = threading.Event()

    def held(*a):
        runs.append(1)
        gate.wait(10)  # hold the first chunk until the cancel is in
        return real(*a)

    monkeypatch.setattr(replay, "run_rows", held)
    job = client.post("/patch", json={**PAIR, "site": "heads_by_position", "async": True}).get_json()["job"]
    deadline = time.monotonic() + 10
    while not runs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ok(client.delete(f"/jobs/{job}"))["status"] == "cancelling"
    gate.set()
    state = wait_job(client, job)
    assert state["status"] == "cancelled" and "result" not in state
    assert len(runs) == 1  # no chunk ran after the cancel
    assert client.delete(f"/jobs/{job}").status_code == 200  # cancelling an ended job is harmless


def test_unknown_job_is_404(client):
    assert "no job 'nope'" in err(client.get("/jobs/nope"), 404)
    assert "no job" in err(client.delete("/jobs/nope"), 404)


def test_interactive_requests_are_served_while_a_sweep_runs(app, client, one_row_chunks):
    long_pair = {**PAIR, "clean": CLEAN + " and then" * 12, "corrupt": CORRUPT + " and then" * 12}
    job = client.post("/patch", json={**long_pair, "site": "heads_by_position", "async": True}).get_json()["job"]
    answered = 0
    for i in range(5):
        r = client.post("/attention", json={"text": f"A new text number {i} while a sweep runs", "layer": 1})
        assert r.status_code == 200
        answered += 1
    state = ok(client.get(f"/jobs/{job}"))
    assert answered == 5 and state["status"] == "running" and 0 < state["progress"] < 1
    client.delete(f"/jobs/{job}")
    wait_job(client, job)


def test_jobs_are_bounded(tiny_model, one_row_chunks):
    from app import create_app
    from explorer.runtime.jobs import JobManager

    app = create_app(model=tiny_model)
    app.extensions["jobs"] = JobManager(max_jobs=4, max_running=2)
    client = app.test_client()
    release = threading.Event()
    app.extensions["explorer"].worker.submit(lambda: release.wait(10))  # hold the worker
    try:
        jobs = [client.post("/patch", json={**PAIR, "site": "heads", "async": True}) for _ in range(3)]
        assert [r.status_code for r in jobs] == [202, 202, 503]
        assert "jobs are already running" in jobs[2].get_json()["error"] and jobs[2].headers["Retry-After"]
    finally:
        release.set()
    for r in jobs[:2]:
        assert wait_job(client, r.get_json()["job"])["status"] == "done"
