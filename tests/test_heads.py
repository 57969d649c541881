"""/ablate, /attribution_patch and POST /jobs/chg against independent computations: ablation with
plain HF forward hooks (the head's slice of `attn.c_proj`'s input is its hook_z), attribution with
plain torch.autograd on the HF model, causal head gating on a model where one head decides the
output by construction; no gradient state or hook is left behind; jobs, routing and every 400.

Ablation and attribution are compared on `peaked` (a tiny model with larger weights): its effects
are of order 1, so an absolute tolerance of 1e-4 is a relative one of about 1e-5."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from tests.helpers import (CLEAN, CORRUPT, FACT, PAIR, TEXT, TINY, HFPatcher, err, grid_shape, ids_of, ok,
                           unstamped, wait_job)


def metric_of(body: dict):
    answer = body["answer"]["token_id"]
    if body["distractor"] is None:
        return lambda logits: logits.log_softmax(-1)[answer]
    distractor = body["distractor"]["token_id"]
    return lambda logits: logits[answer] - logits[distractor]


# --- /ablate ----------------------------------------------------------------------------------

REFERENCES = [TEXT, "A completely different sentence about the weather today"]


def hf_ablation(hf: HFPatcher, ids: list[int], site: str, method: str, references: list[list[int]],
                metric) -> tuple[float, np.ndarray]:
    """(baseline, effect grid) with one forward per ablated head or layer, plain HF hooks."""
    hook_site = {"heads": "z", "attn": "attn_out", "mlp": "mlp_out"}[site]
    captured = [hf.capture(r) for r in references]
    n_layers, n_heads = len(hf.blocks), hf.n_heads
    d_head = hf.model.config.n_embd // n_heads
    with torch.inference_mode():
        baseline = float(metric(hf.model(torch.tensor([ids])).logits[0, -1]))

    def value(layer: int) -> torch.Tensor:  # [d_model]: the mean over every reference position, or zeros
        if method == "zero":
            return torch.zeros(hf.model.config.n_embd)
        return torch.cat([c[hook_site][layer] for c in captured]).mean(0)

    def replace(layer: int, head: int | None):
        def fn(t: torch.Tensor) -> torch.Tensor:
            if head is None:
                t[0, :] = value(layer)
            else:
                sl = slice(head * d_head, (head + 1) * d_head)
                t[0, :, sl] = value(layer)[sl]
            return t
        return fn

    if site == "heads":
        grid = [[hf.metric_with(ids, "z", l, replace(l, h), metric) for h in range(n_heads)] for l in range(n_layers)]
    else:
        grid = [hf.metric_with(ids, hook_site, l, replace(l, None), metric) for l in range(n_layers)]
    return baseline, np.array(grid) - baseline


@pytest.mark.parametrize("site", ["heads", "attn", "mlp"])
@pytest.mark.parametrize("method,references", [("zero", None), ("mean", None), ("mean", REFERENCES)])
def test_ablate_matches_independent_hf_hooks(peaked, tiny_model, site, method, references):
    client, hf_patcher = peaked[0], HFPatcher(peaked[1])
    request = {"text": CLEAN, "answer": " Mary", "distractor": " John", "site": site, "method": method}
    if references:
        request["reference_texts"] = references
    body = ok(client.post("/ablate", json=request))
    ids = ids_of(client, CLEAN)
    ref_ids = [ids_of(client, t) for t in references] if references else [ids]
    baseline, want = hf_ablation(hf_patcher, ids, site, method, ref_ids, metric_of(body))
    cfg = tiny_model.cfg
    got = np.array(body["effect"])
    assert got.shape == want.shape == ((cfg.n_layers, cfg.n_heads) if site == "heads" else (cfg.n_layers,))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert body["baseline"] == pytest.approx(baseline, abs=1e-4)
    assert np.abs(got).max() > 0.5  # the ablations do something
    assert body["site"] == site and body["method"] == method and body["metric"] == "logit_diff"
    positions = None if method == "zero" else sum(len(r) for r in ref_ids)
    assert body["reference_positions"] == positions
    assert body["reference_texts"] == (None if method == "zero" else len(ref_ids))
    assert body["columns"] == ([f"H{h}" for h in range(cfg.n_heads)] if site == "heads" else None)


def test_ablate_defaults_and_logprob(client, hf_patcher):
    body = ok(client.post("/ablate", json={"text": TEXT, "answer": " mat"}))
    assert body["site"] == "heads" and body["method"] == "mean" and body["metric"] == "logprob"
    ids = ids_of(client, TEXT)
    _, want = hf_ablation(hf_patcher, ids, "heads", "mean", [ids], metric_of(body))
    np.testing.assert_allclose(np.array(body["effect"]), want, atol=1e-4)


def test_ablate_async_equals_sync(client):
    request = {"text": CLEAN, "answer": " Mary", "method": "mean", "reference_texts": REFERENCES}
    r = client.post("/ablate", json={**request, "async": True})
    assert r.status_code == 202
    state = wait_job(client, r.get_json()["job"])
    assert state["status"] == "done" and state["kind"] == "ablate"
    assert unstamped(state["result"]) == ok(client.post("/ablate", json=request))


@pytest.mark.parametrize("change,needle", [
    ({"site": "neurons"}, "site must be one of 'heads', 'attn', 'mlp'"),
    ({"method": "resample"}, "method must be one of 'mean', 'zero'"),
    ({"method": "zero", "reference_texts": ["a"]}, "reference_texts applies only to method 'mean'"),
    ({"reference_texts": []}, "reference_texts must hold between 1 and 64 texts, got 0"),
    ({"reference_texts": ["ok", ""]}, "reference_texts[1]: text must be a non-empty string"),
    ({"reference_texts": ["word " * 100]}, "reference_texts[0]: text is 102 tokens long"),
    ({"reference_texts": "a text"}, "reference_texts must be a list of strings"),
    ({"answer": " Mary Ann"}, "answer ' Mary Ann' is 2 tokens"),
    ({"text": ""}, "text must be a non-empty string"),
    ({"extra": 1}, "unknown field 'extra'"),
])
def test_ablate_bad_requests(client, change, needle):
    assert needle in err(client.post("/ablate", json={"text": CLEAN, "answer": " Mary", **change}))


# --- /attribution_patch -----------------------------------------------------------------------

def hf_attribution(hf_model, site: str, base_ids: list[int], source_ids: list[int], metric) -> np.ndarray:
    """(source - base) . d metric / d activation at the base run, by torch.autograd on plain HF:
    each site's tensors are kept by hooks and differentiated as they are."""
    blocks = hf_model.transformer.h
    n_heads = hf_model.config.n_head

    def run(ids: list[int], grad: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        kept: list[torch.Tensor] = []
        handles = []
        for block in blocks:
            if site in ("resid_pre", "heads", "heads_by_position"):
                module = block if site == "resid_pre" else block.attn.c_proj
                handles.append(module.register_forward_pre_hook(lambda m, args: kept.append(args[0])))
            else:
                module = block.attn if site == "attn_out" else block.mlp
                handles.append(module.register_forward_hook(
                    lambda m, args, out: kept.append(out[0] if isinstance(out, tuple) else out)))
        try:
            with torch.enable_grad() if grad else torch.inference_mode():
                logits = hf_model(torch.tensor([ids])).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        return kept, metric(logits)

    source, _ = run(source_ids, grad=False)
    base, value = run(base_ids, grad=True)
    grads = torch.autograd.grad(value, base)
    with torch.no_grad():
        per = [((s[0] - b[0]) * g[0]) for s, b, g in zip(source, base, grads)]  # [seq, d_model] each
        if site.startswith("heads"):
            per = [p.reshape(p.shape[0], n_heads, -1).sum(-1) for p in per]  # [seq, n_heads]
            return np.stack([p.sum(0).numpy() if site == "heads" else p.T.numpy() for p in per])
        return np.stack([p.sum(-1).numpy() for p in per])


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position"])
def test_attribution_matches_independent_autograd(peaked, tiny_model, site, direction):
    client, hf_model = peaked
    body = ok(client.post("/attribution_patch", json={**PAIR, "site": site, "direction": direction}))
    clean_ids, corrupt_ids = ids_of(client, CLEAN), ids_of(client, CORRUPT)
    base, source = (corrupt_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupt_ids)
    want = hf_attribution(hf_model, site, base, source, metric_of(body))
    got = np.array(body["attribution"])
    assert got.shape == want.shape == grid_shape(site, tiny_model.cfg, len(base))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 0.5  # not all zero
    base_metric = body["corrupt_metric"] if direction == "denoise" else body["clean_metric"]
    np.testing.assert_allclose(np.array(body["effect"]), base_metric + got, atol=1e-5)
    span = body["clean_metric"] - body["corrupt_metric"]
    np.testing.assert_allclose(np.array(body["recovery"]), (np.array(body["effect"]) - body["corrupt_metric"]) / span,
                               rtol=1e-4, atol=1e-4)
    assert body["exact_available"] is True and "exact_effect" not in body and "pearson" not in body


@pytest.mark.parametrize("site", ["resid_pre", "heads"])
def test_attribution_compare_is_the_real_patch_grid(peaked, site):
    client = peaked[0]
    body = ok(client.post("/attribution_patch", json={**PAIR, "site": site, "compare": True}))
    real = ok(client.post("/patch", json={**PAIR, "site": site}))
    assert body["exact_effect"] == real["effect"] and body["exact_recovery"] == real["recovery"]
    est, exact = np.array(body["effect"], dtype=np.float64), np.array(real["effect"], dtype=np.float64)
    assert body["pearson"] == pytest.approx(np.corrcoef(est.ravel(), exact.ravel())[0, 1], abs=1e-6)
    error = np.abs(est - exact)
    assert body["max_abs_error"] == pytest.approx(error.max(), abs=1e-6)
    np.testing.assert_allclose(body["max_abs_error_by_layer"], error.max(1), atol=1e-6)
    for key in ("site", "metric", "clean_metric", "corrupt_metric", "tokens_clean", "rows", "columns"):
        assert body[key] == real[key]


def test_attribution_of_identical_prompts_is_zero_and_pearson_null(client):
    body = ok(client.post("/attribution_patch", json={**PAIR, "corrupt": CLEAN, "site": "heads", "compare": True}))
    assert np.all(np.array(body["attribution"]) == 0) and body["recovery"] is None and "undefined" in body["warning"]
    assert body["pearson"] is None and body["max_abs_error"] == 0


def test_async_attribution_with_compare(client):
    r = client.post("/attribution_patch", json={**PAIR, "site": "heads", "compare": True, "async": True})
    assert r.status_code == 202
    state = wait_job(client, r.get_json()["job"])
    assert state["status"] == "done" and state["kind"] == "attribution_patch"
    assert unstamped(state["result"]) == ok(client.post("/attribution_patch",
                                                        json={**PAIR, "site": "heads", "compare": True}))


@pytest.mark.parametrize("change,needle", [
    ({"site": "neurons"}, "site must be one of 'resid_pre'"),
    ({"direction": "sideways"}, "direction must be one of 'denoise', 'noise'"),
    ({"corrupt": "When Mary went"}, "clean has 15, corrupt has 4"),
    ({"compare": "yes"}, "compare must be true or false"),
    ({"distractor": " Mary"}, "answer and distractor are the same token"),
])
def test_attribution_bad_requests(client, change, needle):
    assert needle in err(client.post("/attribution_patch", json={**PAIR, "site": "heads", **change}))


def hook_count(bridge) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in bridge.modules()) \
        + sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())


def worker_modes(app) -> tuple[bool, bool]:
    return app.extensions["explorer"].worker.submit(
        lambda: (torch.is_grad_enabled(), torch.is_inference_mode_enabled())).result(10)


def test_gradients_leave_nothing_behind(app, client, tiny_model):
    bridge = tiny_model.bridge
    request = {"text": TEXT, "layer": 1}
    before = client.post("/attention", json=request).data
    hooks, modes = hook_count(bridge), worker_modes(app)
    ok(client.post("/attribution_patch", json={**PAIR, "site": "resid_pre", "compare": True}))
    job = ok_job(client, {"texts": [CLEAN], "targets": [" Mary"], "steps": 3})
    assert wait_job(client, job)["status"] == "done"
    assert all(p.grad is None for p in bridge.parameters())
    assert hook_count(bridge) == hooks and worker_modes(app) == modes == (False, True)
    app.extensions["explorer"].cache.clear()  # recompute the pattern with the model as it is now
    assert client.post("/attention", json=request).data == before


# --- causal head gating -----------------------------------------------------------------------

DECISIVE = (1, 2)  # (layer, head): the only head whose output reaches the residual stream
CHG_PROMPTS = ["The cat sat on the", CLEAN, FACT, "One two three four five"]


def ok_job(client, body: dict) -> str:
    r = client.post("/jobs/chg", json=body)
    assert r.status_code == 202, r.get_json()
    job = r.get_json()["job"]
    assert r.headers["Location"] == f"/jobs/{job}"
    return job


@pytest.fixture(scope="module")
def decisive(tmp_path_factory):
    """(client, HF model) of a tiny GPT-2 with peaked outputs where every head but DECISIVE has
    zero output weights (its rows of attn.c_proj), so only that head can change the output."""
    from transformers import GPT2LMHeadModel

    from app import create_app
    from model_utils import load_model, random_gpt2

    path = tmp_path_factory.mktemp("decisive-gpt2")
    hf = random_gpt2(str(path), seed=1234, initializer_range=0.4, **TINY)
    d_head = TINY["n_embd"] // TINY["n_head"]
    with torch.no_grad():
        for layer, block in enumerate(hf.transformer.h):
            for head in range(TINY["n_head"]):
                if (layer, head) != DECISIVE:
                    block.attn.c_proj.weight[head * d_head:(head + 1) * d_head] = 0
    hf.save_pretrained(path)
    model = load_model(str(path), device="cpu")
    assert (model.cfg.n_layers, model.cfg.n_heads) == (TINY["n_layer"], TINY["n_head"])
    hf = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    return create_app({"TESTING": True}, model=model).test_client(), hf


def logprobs(hf_model, ids: list[int], without: tuple[int, int] | None = None) -> torch.Tensor:
    """Next-token log-probabilities after `ids`, optionally with one head's output zeroed."""
    handle = None
    if without is not None:
        layer, head = without
        d_head = hf_model.config.n_embd // hf_model.config.n_head

        def zero(m, args):
            x = args[0].clone()
            x[..., head * d_head:(head + 1) * d_head] = 0
            return (x,)
        handle = hf_model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero)
    try:
        with torch.inference_mode():
            return hf_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()


def head_targets(client, hf_model, helped: bool) -> list[int]:
    """Per prompt, the token the decisive head raises most (helped) or lowers most, checked to
    move by more than 2 nats."""
    targets = []
    for text in CHG_PROMPTS:
        ids = ids_of(client, text)
        change = logprobs(hf_model, ids) - logprobs(hf_model, ids, without=DECISIVE)
        token = int(change.argmax() if helped else change.argmin())
        assert abs(float(change[token])) > 2
        targets.append(token)
    return targets


@pytest.mark.parametrize("helped,role", [(True, "facilitating"), (False, "interfering")])
def test_chg_finds_the_decisive_head(decisive, helped, role):
    client, hf_model = decisive
    targets = head_targets(client, hf_model, helped)
    job = ok_job(client, {"texts": CHG_PROMPTS, "targets": targets, "steps": 30, "seed": 1})
    state = wait_job(client, job)
    assert state["status"] == "done" and state["kind"] == "chg", state
    result = state["result"]
    layer, head = DECISIVE
    labels = np.array(result["taxonomy"])
    assert labels[layer, head] == role
    assert np.sum(labels == "irrelevant") == labels.size - 1  # the others cannot change anything
    assert result["counts"] == {"facilitating": int(helped), "interfering": int(not helped),
                                "irrelevant": labels.size - 1, "ambiguous": 0}
    for stage in ("unregularized", "toward_zero", "toward_one"):
        gates = np.array(result["gates"][stage])
        assert gates.shape == (TINY["n_layer"], TINY["n_head"]) and np.all((gates >= 0) & (gates <= 1))
        assert len(result["loss_history"][stage]) == 30
    # the cross-entropy of the ungated model, recomputed with plain HF
    want = -np.mean([float(logprobs(hf_model, ids_of(client, t))[a]) for t, a in zip(CHG_PROMPTS, targets)])
    assert result["loss_ungated"] == pytest.approx(want, abs=1e-4)
    # gating the decisive head moves the loss the right way: toward its clip limit
    gate = result["gates"]["unregularized"][layer][head]
    assert gate > 0.9 if helped else gate < 0.1
    if not helped:  # closing a harmful head beats the model as it is
        assert result["loss"]["unregularized"] < result["loss_ungated"]


def test_chg_same_seed_same_gates(client):
    body = {"texts": [CLEAN, TEXT], "targets": [" Mary", " mat"], "steps": 4, "seed": 7}
    first, again, other = (unstamped(wait_job(client, ok_job(client, b))["result"])
                           for b in (body, body, {**body, "seed": 8}))
    assert first == again
    assert first["gates"]["unregularized"] != other["gates"]["unregularized"]
    assert (first["steps"], first["seed"], first["lambda"], first["n_texts"]) == (4, 7, 0.1, 2)


def test_chg_progress_cancel_and_interactive_requests(client):
    job = ok_job(client, {"texts": [CLEAN], "targets": [" Mary"], "steps": 1000})
    deadline = time.monotonic() + 30
    while (state := ok(client.get(f"/jobs/{job}")))["progress"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state["stage"] == "unregularized" and state["steps"] == 1000 and state["step"] >= 1
    for i in range(3):  # answered between the job's chunks
        assert client.post("/attention", json={"text": f"Another text {i} while gates train", "layer": 0}).status_code == 200
    state = ok(client.get(f"/jobs/{job}"))
    assert state["status"] == "running" and 0 < state["progress"] < 1 and isinstance(state["loss"], float)
    assert ok(client.delete(f"/jobs/{job}"))["status"] == "cancelling"
    state = wait_job(client, job)
    assert state["status"] == "cancelled" and "result" not in state


def test_chg_job_route_beside_get_and_delete(client):
    assert "no job 'chg'" in err(client.get("/jobs/chg"), 404)
    assert "no job 'chg'" in err(client.delete("/jobs/chg"), 404)
    assert "POST is not allowed" in err(client.post("/jobs/0123456789abcdef", json={}), 405)


@pytest.mark.parametrize("change,needle", [
    ({"texts": []}, "texts must hold between 1 and 64 texts, got 0"),
    ({"targets": [" Mary", " mat"]}, "targets must hold one answer per text: 1 texts, 2 targets"),
    ({"targets": [" Mary Ann"]}, "targets[0] ' Mary Ann' is 2 tokens"),
    ({"targets": [10**6]}, "targets[0] must be a token id between 0 and"),
    ({"texts": [""]}, "texts[0]: text must be a non-empty string"),
    ({"texts": ["word " * 100]}, "texts[0]: text is 102 tokens long"),
    ({"steps": 0}, "steps must be between 1 and 1000, got 0"),
    ({"steps": 1001}, "steps must be between 1 and 1000"),
    ({"lr": 0}, "lr must be a number above 0 and at most 10.0"),
    ({"lr": -1.0}, "lr must be a number above 0"),
    ({"lambda": -0.1}, "lambda must be between 0 and 10.0"),
    ({"seed": -1}, "seed must be between 0"),
    ({"steps": 1.5}, "steps must be an integer"),
    ({"lam": 0.1}, "unknown field 'lam'"),
    ({"async": True}, "unknown field 'async'"),
])
def test_chg_bad_requests(client, change, needle):
    assert needle in err(client.post("/jobs/chg", json={"texts": [CLEAN], "targets": [" Mary"], **change}))


def test_chg_micro_batches_equal_one_batch(client, monkeypatch):
    """Texts of different lengths padded into one batch, or one text per chunk with the step's
    gradient summed over chunks: the same training."""
    from explorer.math import chg, replay

    body = {"texts": CHG_PROMPTS, "targets": [" mat", " Mary", " Paris", " six"], "steps": 5, "seed": 3}
    ids = [ids_of(client, t) for t in CHG_PROMPTS]
    ex = client.application.extensions["explorer"]
    cfg = ex.model.cfg
    assert len(chg.micro_batches(ids, cfg, ex.budget(max(map(len, ids))))) == 1 and len({len(i) for i in ids}) > 1
    whole = wait_job(client, ok_job(client, body))["result"]
    monkeypatch.setattr(replay, "budget", lambda *a: replay.Budget(1, 1.0))  # one text per chunk
    assert [len(batch) for batch in chg.micro_batches(ids, cfg, ex.budget(max(map(len, ids))))] == [1] * len(ids)
    state = wait_job(client, ok_job(client, body))
    split = state["result"]
    assert state["status"] == "done" and split["loss_ungated"] == pytest.approx(whole["loss_ungated"], abs=1e-5)
    for stage in whole["stages"]:
        np.testing.assert_allclose(split["gates"][stage], whole["gates"][stage], atol=1e-4)
        np.testing.assert_allclose(split["loss_history"][stage], whole["loss_history"][stage], atol=1e-4)
    assert split["taxonomy"] == whole["taxonomy"]
