"""/lens, /score and /dla against an independent computation: plain HF transformers on the same
weights, hooks written here and in tests/helpers.py (HF's last hidden state is after ln_f, so block
outputs are hooked)."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
import torch

from explorer.math import forward as analysis
from explorer.math import lens
from explorer.operations import lens as lens_op
from model_utils import Explorer
from tests.helpers import TEXT, block_outputs, ids_of, ok

TEXTS = [TEXT, "Hello, world! Ünïcödé → 数学 and emoji 🙂 too.", "One two three four five six seven eight."]
N_LAYERS, N_HEADS = 3, 4  # the tiny model


def hf_lens_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """lm_head(ln_f(output of block l)) for every layer l and position: [n_layers, seq, d_vocab]."""
    with block_outputs(hf_model.transformer.h) as outputs, torch.inference_mode():
        hf_model(torch.tensor([ids]))
        hidden = torch.stack(outputs)[:, 0]
        return hf_model.lm_head(hf_model.transformer.ln_f(hidden))


def rank_bounds(logits: torch.Tensor, target: int, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest rank `target` can have when logits within `tol` of it may tie."""
    t = logits[..., target : target + 1]
    return (((logits > t + tol).sum(-1) + 1).numpy(), ((logits > t - tol).sum(-1) + 1).numpy())


def reference_crossover(rank: np.ndarray) -> int | None:
    """Independent of lens.crossover_layer: scan from the last layer down."""
    if rank[-1] != 1:
        return None
    layer = len(rank) - 1
    while layer > 0 and rank[layer - 1] == 1:
        layer -= 1
    return layer


def test_tiny_model_size(tiny_model):
    assert (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads) == (N_LAYERS, N_HEADS)


@pytest.mark.parametrize("text", TEXTS)
def test_lens_grid_matches_hf_every_cell(client, hf_model, hf_tokenizer, text):
    ids = ids_of(client, text)
    logits = hf_lens_logits(hf_model, ids).double()  # [n_layers, seq, d_vocab]
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    target = int(logits[-1, -1].argmax())  # the model's own answer at the last position: it crosses over
    k = 10
    body = ok(client.post("/lens", json={"text": text, "target": target, "top_k": k}))
    seq = len(ids)
    assert body["positions"] == list(range(seq)) and len(body["tokens"]) == seq
    assert len(body["top"]) == len(body["entropy"]) == len(body["kl_to_final"]) == N_LAYERS
    worst = {"probability": 0.0, "entropy": 0.0, "kl": 0.0, "target": 0.0}
    for layer in range(N_LAYERS):
        for pos in range(seq):
            cell = body["top"][layer][pos]
            got_p = np.array([t["probability"] for t in cell])
            got_ids = [t["token_id"] for t in cell]
            top = probs[layer, pos].topk(k)
            np.testing.assert_allclose(got_p, top.values.numpy(), rtol=1e-4, atol=1e-7)
            # ids agree except where two probabilities tie within float noise
            np.testing.assert_allclose(probs[layer, pos, got_ids].numpy(), got_p, rtol=1e-4, atol=1e-7)
            entropy = float(-(probs[layer, pos] * logp[layer, pos]).sum())
            kl = float((probs[-1, pos] * (logp[-1, pos] - logp[layer, pos])).sum())
            assert body["entropy"][layer][pos] == pytest.approx(entropy, abs=1e-4)
            assert body["kl_to_final"][layer][pos] == pytest.approx(kl, abs=1e-4)
            worst["probability"] = max(worst["probability"], float(np.abs(got_p - top.values.numpy()).max()))
            worst["entropy"] = max(worst["entropy"], abs(body["entropy"][layer][pos] - entropy))
            worst["kl"] = max(worst["kl"], abs(body["kl_to_final"][layer][pos] - kl))
    assert all(v == 0.0 for v in body["kl_to_final"][-1])  # exactly 0 at the last layer
    # the last layer is the model's own output distribution, and `final` repeats it
    assert body["final"] == body["top"][-1]
    tgt = body["target"]
    assert (tgt["token_id"], tgt["token"]) == (target, hf_tokenizer.decode([target]))
    np.testing.assert_allclose(tgt["probability"], probs[:, :, target].numpy(), rtol=1e-4, atol=1e-8)
    worst["target"] = float(np.abs(np.array(tgt["probability"]) - probs[:, :, target].numpy()).max())
    low, high = rank_bounds(logits, target)
    rank = np.array(tgt["rank"])
    assert np.all((low <= rank) & (rank <= high))
    assert tgt["crossover_layer"] == [reference_crossover(low[:, p]) for p in range(seq)]
    assert tgt["crossover_layer"][-1] is not None  # the last position's answer is top-1 at the end
    print(f"\nlens vs HF, {text[:20]!r}: max |diff| {worst}")


def test_lens_target_as_string_or_id_and_positions_subset(client):
    by_id = ok(client.post("/lens", json={"text": TEXT, "target": 2603, "positions": [6, 2], "top_k": 3}))
    by_str = ok(client.post("/lens", json={"text": TEXT, "target": " mat", "positions": [6, 2], "top_k": 3}))
    assert by_id == by_str and by_id["target"]["token"] == " mat"
    full = ok(client.post("/lens", json={"text": TEXT, "target": 2603, "top_k": 3}))
    assert by_id["positions"] == [6, 2]
    for key in ("top", "entropy", "kl_to_final"):
        assert [[row[6], row[2]] for row in full[key]] == by_id[key]
    assert [[row[6], row[2]] for row in full["target"]["rank"]] == by_id["target"]["rank"]
    plain = ok(client.post("/lens", json={"text": TEXT}))
    assert plain["target"] is None and all(len(c) == 1 for row in plain["top"] for c in row)  # top_k 1


def test_crossover_layer_rule():
    assert lens.crossover_layer(np.array([1, 1, 1])) == 0
    assert lens.crossover_layer(np.array([5, 1, 1])) == 1
    assert lens.crossover_layer(np.array([1, 3, 1])) == 2
    assert lens.crossover_layer(np.array([1, 1, 2])) is None


@pytest.fixture()
def readouts(monkeypatch) -> list:
    """Every lens readout (analysis.lens_logits call) from here on."""
    log: list = []
    real = analysis.lens_logits
    monkeypatch.setattr(analysis, "lens_logits", lambda *a: log.append(a[2]) or real(*a))
    return log


def test_lens_and_predict_share_the_cached_readout(tiny_model, readouts):
    ex = Explorer(tiny_model)
    text = "Sharing one readout per position between two endpoints."
    seq = len(ex.tokens(text)[0])
    grid = ex.lens(text, top_k=10)
    assert sorted(readouts) == list(range(seq))  # one readout per position
    for p in range(seq):
        layers = ex.predict(text, p, 10)["predictions_by_layer"]
        assert [[t["token_id"] for t in l["top_tokens"]] for l in layers] == \
               [[t["token_id"] for t in grid["top"][l][p]] for l in range(N_LAYERS)]
    assert ex.worker.wait_idle(30)
    assert len(readouts) == seq  # /predict and its prefetch read the grid's cache
    # the other way round: /predict (and its prefetch) first, then the grid costs nothing
    ex2 = Explorer(tiny_model)
    ex2.predict(text, 0, 5)
    assert ex2.worker.wait_idle(30)
    readouts.clear()
    assert ex2.lens(text, top_k=10) == grid and readouts == []
    # a target needs every token's logit: one readout per position, once; the lens it fills is
    # byte-identical to the one /predict computes
    ex3 = Explorer(tiny_model)
    ex3.lens(text, target=" the")
    ex3.lens(text, target=" the", top_k=4)
    assert len(readouts) == seq
    # whichever endpoint filled the cache, /predict answers byte for byte as with no cache at all
    fresh = Explorer(tiny_model, cache_bytes=0)
    expected = [orjson.dumps(fresh.predict(text, p, 100), option=orjson.OPT_SERIALIZE_NUMPY) for p in range(seq)]
    for warm in (ex, ex3):
        assert [orjson.dumps(warm.predict(text, p, 100), option=orjson.OPT_SERIALIZE_NUMPY)
                for p in range(seq)] == expected


def test_lens_position_bound(client, monkeypatch):
    monkeypatch.setattr(lens_op, "MAX_POSITIONS", 4)
    r = client.post("/lens", json={"text": TEXT})
    assert r.status_code == 400 and "at most 4 positions" in r.get_json()["error"]
    assert client.post("/lens", json={"text": TEXT, "positions": [0, 1, 2, 3]}).status_code == 200


# --- /score -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_score_matches_hf(client, hf_model, temperature):
    k = 7
    body = ok(client.post("/score", json={"texts": TEXTS, "temperature": temperature, "top_k": k}))
    assert body["temperature"] == temperature and len(body["results"]) == len(TEXTS)
    worst = {"token_logprobs": 0.0, "final_logprob": 0.0, "final_logit": 0.0}
    for text, res in zip(TEXTS, body["results"]):
        ids = ids_of(client, text)
        assert res["token_ids"] == ids and len(res["tokens"]) == len(ids)
        with torch.inference_mode():
            logits = hf_model(torch.tensor([ids])).logits[0].double()
        logp = logits.log_softmax(-1)
        want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert res["token_logprobs"][0] is None
        np.testing.assert_allclose(res["token_logprobs"][1:], want, atol=1e-5)
        worst["token_logprobs"] = max(worst["token_logprobs"], float(np.abs(np.array(res["token_logprobs"][1:]) - want).max()))
        assert res["perplexity"] == pytest.approx(math.exp(-np.mean(want)), rel=1e-5)
        tempered = (logits[-1] / temperature).log_softmax(-1)
        top = tempered.topk(k)
        got = res["final"]
        np.testing.assert_allclose([t["logprob"] for t in got], top.values.numpy(), atol=1e-5)
        np.testing.assert_allclose([t["probability"] for t in got], top.values.exp().numpy(), rtol=1e-5)
        np.testing.assert_allclose([tempered[t["token_id"]].item() for t in got], [t["logprob"] for t in got], atol=1e-5)
        np.testing.assert_allclose([t["logit"] for t in got], logits[-1, [t["token_id"] for t in got]].numpy(), atol=1e-4)
        worst["final_logprob"] = max(worst["final_logprob"], float(np.abs(np.array([t["logprob"] for t in got]) - top.values.numpy()).max()))
        worst["final_logit"] = max(worst["final_logit"], float(np.abs(np.array([t["logit"] for t in got]) - logits[-1, [t["token_id"] for t in got]].numpy()).max()))
    print(f"\nscore vs HF at T={temperature}: max |diff| {worst}")


def test_score_batch_equals_one_by_one(tiny_model):
    texts = TEXTS + ["x", TEXT + " again and again"]
    batched = Explorer(tiny_model).score(texts, 0.8, 10)["results"]
    worst = 0.0
    for text, res in zip(texts, batched):
        alone = Explorer(tiny_model).score([text], 0.8, 10)["results"][0]
        assert alone["token_ids"] == res["token_ids"]
        worst = max(worst, float(np.abs(np.array(alone["token_logprobs"][1:]) - res["token_logprobs"][1:]).max()))
        assert [t["token_id"] for t in alone["final"]] == [t["token_id"] for t in res["final"]]
        np.testing.assert_allclose([t["logprob"] for t in alone["final"]], [t["logprob"] for t in res["final"]], atol=1e-5)
        assert alone["perplexity"] == pytest.approx(res["perplexity"], rel=1e-5)
    assert worst <= 1e-5
    print(f"\nbatched vs one-by-one token_logprobs: max |diff| {worst}")


def test_score_read_out_in_slices_equals_one_projection(tiny_model, monkeypatch):
    """Slices of 3 rows cross every text's boundaries (`x` is 2 tokens): the same scores."""
    texts = TEXTS + ["x", TEXT + " again and again"]
    whole = Explorer(tiny_model).score(texts, 0.8, 10)["results"]
    monkeypatch.setattr(lens, "READOUT_ROWS", 3)
    sliced = Explorer(tiny_model).score(texts, 0.8, 10)["results"]
    for a, b in zip(whole, sliced):
        assert a["token_ids"] == b["token_ids"] and len(a["token_logprobs"]) == len(b["token_logprobs"])
        np.testing.assert_allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], atol=1e-5)
        assert [t["token_id"] for t in a["final"]] == [t["token_id"] for t in b["final"]]


def test_batched_runs_equal_single_runs(tiny_model):
    ids = [[50256, 464, 3797, 3332, 319, 262, 2603], [50256, 15496], [50256, *range(100, 120)]]
    with torch.inference_mode():
        batch = analysis.forward_batch(tiny_model.bridge, ids)
        for one, run in zip(ids, batch):
            alone = analysis.forward(tiny_model.bridge, one)
            assert run.token_ids.tolist() == one and run.resid.is_contiguous()
            torch.testing.assert_close(run.resid, alone.resid, atol=1e-5, rtol=0)
            scale = analysis.PATTERN_SCALE  # the cache holds weight * scale in float16
            torch.testing.assert_close(run.patterns.float() / scale, alone.patterns.float() / scale, atol=1e-3, rtol=0)
            assert run.nbytes == alone.nbytes


def test_batches_respect_the_token_budget():
    lengths = [5, 30, 7, 100, 2, 30]
    groups = lens.batches(lengths, budget=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 64
    assert [3] in groups  # longer than the budget: alone


def test_score_runs_one_batch_and_fills_the_run_cache(tiny_model, calls, monkeypatch):
    passes: list[int] = []
    real = analysis.forward_batch
    monkeypatch.setattr(analysis, "forward_batch", lambda b, batch: passes.append(len(batch)) or real(b, batch))
    ex = Explorer(tiny_model)
    texts = [f"Batch text number {i} with some words" for i in range(5)]
    ex.run(texts[0])  # one of them is cached already
    assert passes == [1]
    ex.score(texts)
    assert passes == [1, 4]  # the other four in one padded batch
    for text in texts:  # every endpoint now reads the cached runs
        ex.attention(text, 1, None)
        ex.trace(text, None)
        ex.predict(text, 2, 3)
        ex.lens(text)
    ex.score(texts, 2.0)
    assert passes == [1, 4] and len(calls["forward"]) == 1


# --- /dla -------------------------------------------------------------------------------------

@torch.no_grad()
def hf_dla(hf_model, ids: list[int], position: int, answer: int, distractor: int | None) -> dict:
    """DLA by hand on HF GPT-2: each head's merged-z slice through its c_proj rows, each block's
    attention and MLP output, wte + wpe, all through ln_f with its scale frozen, dotted with the
    unembedding direction."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for l, block in enumerate(hf_model.transformer.h):
        handles.append(block.attn.c_proj.register_forward_hook(
            lambda m, i, o, l=l: got.update({f"z{l}": i[0][0, position], f"attn{l}": o[0, position]})))
        handles.append(block.mlp.register_forward_hook(lambda m, i, o, l=l: got.update({f"mlp{l}": o[0, position]})))
    handles.append(hf_model.transformer.ln_f.register_forward_hook(
        lambda m, i, o: got.update({"resid": i[0][0, position]})))
    try:
        with torch.inference_mode():
            logits = hf_model(torch.tensor([ids])).logits[0, position].double()
    finally:
        for h in handles:
            h.remove()
    ln = hf_model.transformer.ln_f
    resid = got["resid"].double()
    scale = torch.sqrt(resid.var(unbiased=False) + ln.eps)
    w_u = hf_model.lm_head.weight.double()  # [d_vocab, d_model]
    direction = w_u[answer] - (w_u[distractor] if distractor is not None else 0)

    def project(x: torch.Tensor) -> float:
        x = x.double()
        return float(((x - x.mean()) / scale * ln.weight.double()) @ direction)

    d_head = resid.shape[0] // N_HEADS
    heads, attn_bias, attn, mlp = [], [], [], []
    for l, block in enumerate(hf_model.transformer.h):
        w_o = block.attn.c_proj.weight.double()  # Conv1D: [in = n_heads * d_head, out = d_model]
        z = got[f"z{l}"].double()
        heads.append([project(z[h * d_head:(h + 1) * d_head] @ w_o[h * d_head:(h + 1) * d_head]) for h in range(N_HEADS)])
        attn_bias.append(project(block.attn.c_proj.bias))
        attn.append(project(got[f"attn{l}"]))
        mlp.append(project(got[f"mlp{l}"]))
    embed = hf_model.transformer.wte.weight[ids[position]] + hf_model.transformer.wpe.weight[position]
    metric = float(logits[answer] - (logits[distractor] if distractor is not None else 0))
    return {"embed": project(embed), "attn": attn, "mlp": mlp, "heads": heads, "attn_bias": attn_bias,
            "bias": float(ln.bias.double() @ direction), "metric": metric}


@pytest.mark.parametrize("text,answer,distractor,position", [
    (TEXT, " mat", " floor", None), (TEXT, " mat", None, None), (TEXT, 262, 3797, 3),
    (TEXTS[1], "!", " world", 0), (TEXTS[2], " nine", None, 5)])
def test_dla_matches_hand_computation_and_adds_up(client, hf_model, text, answer, distractor, position):
    ids = ids_of(client, text)
    body = {"text": text, "answer": answer, "distractor": distractor}
    if position is not None:
        body["position"] = position
    got = ok(client.post("/dla", json=body))
    pos = len(ids) - 1 if position is None else position
    assert got["position"] == pos and got["metric"] == ("logit" if distractor is None else "logit_diff")
    a = got["answer"]["token_id"]
    d = None if distractor is None else got["distractor"]["token_id"]
    want = hf_dla(hf_model, ids, pos, a, d)
    assert np.array(got["heads"]).shape == (N_LAYERS, N_HEADS)
    for key in ("embed", "attn", "mlp", "heads", "attn_bias", "bias"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-4, err_msg=key)
    parts = got["embed"] + sum(got["attn"]) + sum(got["mlp"]) + got["bias"]
    assert parts == pytest.approx(got["total"], abs=1e-4)
    assert got["total"] == pytest.approx(want["metric"], abs=1e-4)
    assert got["model_metric"] == pytest.approx(want["metric"], abs=1e-4)
    for l in range(N_LAYERS):
        assert sum(got["heads"][l]) + got["attn_bias"][l] == pytest.approx(got["attn"][l], abs=1e-4)
    worst = max(abs(parts - got["total"]), abs(got["total"] - want["metric"]),
                max(abs(sum(got["heads"][l]) + got["attn_bias"][l] - got["attn"][l]) for l in range(N_LAYERS)),
                float(np.abs(np.array(got["heads"]) - want["heads"]).max()))
    print(f"\nDLA {text[:12]!r} {answer!r}/{distractor!r}: max residual or |diff| vs HF {worst:.2e}")


def test_dla_is_cached_per_position_and_target(tiny_model, calls, monkeypatch):
    passes: list[int] = []
    real = lens.decompose
    monkeypatch.setattr(lens, "decompose", lambda *a: passes.append(a[2]) or real(*a))
    ex = Explorer(tiny_model)
    first = ex.dla(TEXT, " mat", " floor")
    assert ex.dla(TEXT, " mat", " floor") == first
    ex.dla(TEXT, " the", None)  # another target at the same position: no new pass
    assert passes == [6]
    ex.dla(TEXT, " the", None, 2)
    assert passes == [6, 2]


# --- every 400 --------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,needle", [
    ("/lens", {}, "give either text or token_ids, not both and not neither"),
    ("/lens", {"text": TEXT, "top_k": 0}, "top_k must be between 1 and 10, got 0"),
    ("/lens", {"text": TEXT, "top_k": 11}, "top_k must be between 1 and 10, got 11"),
    ("/lens", {"text": TEXT, "top_k": True}, "top_k"),
    ("/lens", {"text": TEXT, "positions": []}, "positions must not be empty"),
    ("/lens", {"text": TEXT, "positions": [7]}, "positions[] must be between 0 and 6, got 7"),
    ("/lens", {"text": TEXT, "positions": [-1]}, "positions[] must be between 0 and 6, got -1"),
    ("/lens", {"text": TEXT, "positions": [1, 1]}, "positions must not contain duplicates"),
    ("/lens", {"text": TEXT, "positions": "all"}, "positions"),
    ("/lens", {"text": TEXT, "target": " the mat"}, "target ' the mat' is 2 tokens"),
    ("/lens", {"text": TEXT, "target": ""}, "target must be a non-empty string or a token id"),
    ("/lens", {"text": TEXT, "target": 50257}, "target must be a token id between 0 and 50256"),
    ("/lens", {"text": TEXT, "target": [1]}, "target"),
    ("/lens", {"text": "word " * 200}, "at most 64"),
    ("/lens", {"text": TEXT, "position": 1}, "unknown field 'position'"),
    ("/score", {}, "give exactly one of text"),
    ("/score", {"text": TEXT, "texts": [TEXT]}, "give exactly one of text"),
    ("/score", {"texts": []}, "texts must hold between 1 and 16 texts, got 0"),
    ("/score", {"texts": [TEXT] * 17}, "texts must hold between 1 and 16 texts, got 17"),
    ("/score", {"texts": [TEXT, ""]}, "texts[1]: text must be a non-empty string"),
    ("/score", {"texts": [TEXT, "word " * 200]}, "texts[1]: text is"),
    ("/score", {"texts": [TEXT, 3]}, "texts"),
    ("/score", {"text": ""}, "text must be a non-empty string"),
    ("/score", {"text": TEXT, "temperature": 0}, "temperature must be between 0.001 and 1000 (> 0), got 0"),
    ("/score", {"text": TEXT, "temperature": -1.5}, "temperature must be between"),
    ("/score", {"text": TEXT, "temperature": 1e6}, "temperature must be between"),
    ("/score", {"text": TEXT, "temperature": "1"}, "temperature"),
    ("/score", {"text": TEXT, "temperature": True}, "temperature"),
    ("/score", {"text": TEXT, "top_k": 0}, "top_k must be between 1 and 100, got 0"),
    ("/score", {"text": TEXT, "top_k": 101}, "top_k must be between 1 and 100, got 101"),
    ("/dla", {"text": TEXT}, "answer is required"),
    ("/dla", {"text": TEXT, "answer": " the mat"}, "answer ' the mat' is 2 tokens"),
    ("/dla", {"text": TEXT, "answer": " mat", "distractor": "floor mat"}, "distractor 'floor mat' is 2 tokens"),
    ("/dla", {"text": TEXT, "answer": " mat", "distractor": 2603}, "answer and distractor are the same token"),
    ("/dla", {"text": TEXT, "answer": -1}, "answer must be a token id between 0 and 50256"),
    ("/dla", {"text": TEXT, "answer": " mat", "position": 7}, "position must be between 0 and 6, got 7"),
    ("/dla", {"text": TEXT, "answer": " mat", "position": -1}, "position must be between 0 and 6, got -1"),
    ("/dla", {"text": TEXT, "answer": " mat", "position": 1.0}, "position"),
    ("/dla", {"text": TEXT, "answer": None}, "answer"),
])
def test_errors(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.get_json()
    assert set(r.get_json()) == {"error"}
    assert needle in r.get_json()["error"]


@pytest.mark.parametrize("path,body", [("/score", {"text": TEXT}), ("/dla", {"text": TEXT, "answer": " mat"})])
def test_next_token_endpoints_refuse_an_encoder(client, tiny_model, monkeypatch, path, body):
    monkeypatch.setattr(type(tiny_model), "causal", property(lambda self: False))
    r = client.post(path, json=body)
    assert r.status_code == 400 and f"POST {path} needs a causal (next-token) model" in r.get_json()["error"]
