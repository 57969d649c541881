"""Every endpoint on every supported family, against plain HF `transformers` on the same weights.

One suite parametrized over tests/families.py's tiny models (GPT-2, Pythia/GPT-NeoX, Llama,
Qwen3, Gemma 2, BERT), each loaded through `load_model(DIR)` like `python app.py --model DIR`.
The largest difference from HF found for each endpoint and family is written to
test-artifacts/family-diffs.json (merged with earlier runs of part of the suite): absolute, except
for /predict and /lens probabilities (relative: the tiny models' probabilities are ~1e-3).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from app import create_app
from explorer.runtime import loading
from model_utils import load_model, write_random_sae
from tests.families import FAMILIES, build, hf_layers, hf_model, hf_readout
from tests.helpers import (TEXT, HFPatcher, block_outputs, hf_adding, ids_of, ok, reference_decode, reference_encode,
                           reference_params, wait_job)

pytestmark = pytest.mark.slow  # six model families, every endpoint

# A shorter indirect-object pair than tests/helpers.py's.
CLEAN = "When Mary and John went out, John gave a drink to"
CORRUPT = "When Mary and John went out, Mary gave a drink to"
PAIR = {"clean": CLEAN, "corrupt": CORRUPT, "answer": " Mary", "distractor": " John"}
ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "family-diffs.json"
CAUSAL_ONLY = [
    ("/score", {"text": TEXT}),
    ("/dla", {"text": TEXT, "answer": " mat"}),
    ("/patch", {**PAIR, "site": "heads"}),
    ("/causal_trace", {"text": CLEAN, "subject": "Mary and John"}),
    ("/ablate", {"text": CLEAN, "answer": " Mary"}),
    ("/attribution_patch", {**PAIR, "site": "heads"}),
    ("/generate", {"prompt": TEXT}),
    ("/steering_vector", {"layer": 0, "vector": {"kind": "actadd", "positive": "Love", "negative": "Hate"}}),
    ("/jobs/chg", {"texts": [CLEAN], "targets": [" Mary"]}),
]


CAUSAL = [name for name, f in FAMILIES.items() if f.causal]
ENCODERS = [name for name, f in FAMILIES.items() if not f.causal]
causal_families = pytest.mark.parametrize("fam", CAUSAL, indirect=True)


@pytest.fixture(scope="session")
def diffs():
    """family -> endpoint -> the largest |difference| from HF; written at the end of the session."""
    found: dict[str, dict[str, float]] = {}
    yield found
    old = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    for family, values in found.items():
        old.setdefault(family, {}).update(values)
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps({f: old[f] for f in FAMILIES if f in old}, indent=1) + "\n")


@pytest.fixture(scope="session", params=list(FAMILIES))
def fam(request, tmp_path_factory, diffs):
    """One family: its server (test client), the loaded model and HF on the same directory."""
    name = request.param
    path = tmp_path_factory.mktemp(f"family-{name}")
    build(name, str(path))
    model = load_model(str(path), device="cpu")
    hf = hf_model(name, str(path))
    client = create_app({"TESTING": True}, model=model).test_client()

    def record(endpoint: str, value: float) -> None:
        entry = diffs.setdefault(name, {})
        entry[endpoint] = max(entry.get(endpoint, 0.0), float(value))

    return SimpleNamespace(name=name, spec=FAMILIES[name], model=model, hf=hf, client=client, record=record,
                           patcher=HFPatcher(hf))


def hf_forward(fam, ids: list[int]) -> dict[str, torch.Tensor]:
    """HF on `ids`: attentions [n_layers, n_heads, seq, seq], every block's output
    [n_layers, seq, d_model] and the output logits [seq, d_vocab] (float64)."""
    with block_outputs(hf_layers(fam.hf)) as outputs, torch.inference_mode():
        out = fam.hf(torch.tensor([ids]), output_attentions=True)
    return {"attentions": torch.stack(out.attentions)[:, 0], "hidden": torch.stack(outputs)[:, 0],
            "logits": out.logits[0].double()}


def metric(logits: torch.Tensor, ids: dict[str, int]) -> float:
    return float(logits[ids["answer"]] - logits[ids["distractor"]])


def pair_ids(fam) -> dict[str, int]:
    tok = fam.model.tokenizer
    return {k: tok.encode(PAIR[k], add_special_tokens=False)[0] for k in ("answer", "distractor")}


# --- the model and its tokens -----------------------------------------------------------------

def test_model_reports_family_shape_and_bos(fam):
    info = ok(fam.client.get("/model"))
    cfg = fam.hf.config
    assert info["family"] == fam.name
    assert info["causal"] is fam.spec.causal
    assert (info["n_layers"], info["n_heads"], info["d_model"]) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size)
    assert info["n_key_value_heads"] == (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    assert (info["n_key_value_heads"] < info["n_heads"]) is (fam.name in ("qwen3", "gemma2"))  # GQA
    assert info["d_vocab"] == cfg.vocab_size and info["n_ctx"] == cfg.max_position_embeddings
    assert info["prepends_bos"] is fam.spec.prepends_bos
    assert (info["bos_token_id"] is None) is (not info["prepends_bos"])


def test_tokenize_matches_hf_tokenizer_and_special_tokens(fam):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fam.hf.name_or_path)
    own = tok(TEXT, add_special_tokens=False)["input_ids"]
    before, after = {"gpt2": (["<|endoftext|>"], []), "llama": (["<s>"], []), "gemma2": (["<bos>"], []),
                     "bert": (["[CLS]"], ["[SEP]"])}.get(fam.name, ([], []))
    expected = tok.convert_tokens_to_ids(before) + own + tok.convert_tokens_to_ids(after)
    tokens = ok(fam.client.post("/tokenize", json={"text": TEXT}))["tokens"]
    assert [t["token_id"] for t in tokens] == expected
    assert [t["index"] for t in tokens] == list(range(len(expected)))
    assert [t["token_str"] for t in tokens] == [tok.decode([i]) for i in expected]
    info = ok(fam.client.get("/model"))
    assert info["bos_token_id"] == (expected[0] if before else None)
    if not before:  # no BOS: index 0 is the text's first token
        assert tokens[0]["token_str"] == "The"


# --- the four core endpoints ------------------------------------------------------------------

def test_attention_per_query_head_matches_hf(fam):
    ids = ids_of(fam.client, CLEAN)
    ref = hf_forward(fam, ids)["attentions"].numpy()
    n_layers, n_heads = ref.shape[:2]
    worst = worst_full = 0.0
    for layer in range(n_layers):
        got = np.array(ok(fam.client.post("/attention", json={"text": CLEAN, "layer": layer}))["attention_matrix"])
        assert got.shape == (n_heads, len(ids), len(ids))  # every query head, GQA included
        # compact: float16's relative precision, and no nonzero weight reported as 0
        assert (np.abs(got - ref[layer]) <= 1e-3 * ref[layer] + 1e-7).all()
        assert not (got[ref[layer] > 0] == 0).any()
        worst = max(worst, float(np.abs(got - ref[layer]).max()))
        full = ok(fam.client.post("/attention", json={"text": CLEAN, "layer": layer, "precision": "full"}))
        np.testing.assert_allclose(np.array(full["attention_matrix"]), ref[layer], rtol=0, atol=1e-6)
        worst_full = max(worst_full, float(np.abs(np.array(full["attention_matrix"]) - ref[layer]).max()))
        upper = np.triu(got, k=1)
        if fam.spec.causal:
            assert not upper.any()
        else:  # bidirectional: later tokens are attended to
            assert upper.max() > 0.01
        one = ok(fam.client.post("/attention", json={"text": CLEAN, "layer": layer, "head": n_heads - 1}))
        assert np.array_equal(np.array(one["attention_matrix"]), got[-1])
        if fam.name == "gemma2":  # sliding-window layers (window 4) see no older key; global ones do
            old_keys = np.tril(got, k=-fam.hf.config.sliding_window)
            assert (not old_keys.any()) is (fam.hf.config.layer_types[layer] == "sliding_attention")
    fam.record("attention", worst)
    fam.record("attention_full", worst_full)


def test_predict_logit_lens_matches_hf(fam):
    ids = ids_of(fam.client, TEXT)
    ref = hf_forward(fam, ids)
    with torch.inference_mode():
        lens = hf_readout(fam.hf, ref["hidden"]).double().softmax(-1)  # [n_layers, seq, d_vocab]
    output = ref["logits"].softmax(-1)
    k = 5
    worst = 0.0
    for pos in range(len(ids)):
        body = ok(fam.client.post("/predict", json={"text": TEXT, "token_index": pos, "top_k": k}))
        assert body["objective"] == ("next_token" if fam.spec.causal else "masked")
        layers = body["predictions_by_layer"]
        assert len(layers) == lens.shape[0]
        for layer, entry in enumerate(layers):
            got_ids = [t["token_id"] for t in entry["top_tokens"]]
            got_p = np.array([t["probability"] for t in entry["top_tokens"]])
            np.testing.assert_allclose(got_p, lens[layer, pos].topk(k).values.numpy(), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(lens[layer, pos, got_ids].numpy(), got_p, rtol=1e-4, atol=1e-7)
            worst = max(worst, float((np.abs(lens[layer, pos, got_ids].numpy() - got_p) / got_p).max()))
        # the last layer is the model's own output distribution (soft-capped, or the MLM head's)
        last = np.array([t["probability"] for t in layers[-1]["top_tokens"]])
        np.testing.assert_allclose(last, output[pos].topk(k).values.numpy(), rtol=1e-4)
        assert layers[-1]["top_tokens"][0]["token_id"] == int(output[pos].argmax())
    fam.record("predict", worst)


def test_trace_matches_pca_of_hf_hidden_states(fam):
    ids = ids_of(fam.client, TEXT)
    data = ok(fam.client.post("/trace", json={"text": TEXT}))
    own = list(range(1 if fam.spec.prepends_bos else 0, len(ids) - (0 if fam.spec.causal else 1)))
    assert data["token_indices"] == own  # default: the text's own tokens, no BOS/[CLS]/[SEP]
    hidden = hf_forward(fam, ids)["hidden"]
    n_layers = hidden.shape[0]
    points = hidden[:, own].transpose(0, 1).reshape(-1, hidden.shape[-1]).double().numpy()
    pca = PCA(n_components=2, svd_solver="full")
    want = pca.fit_transform(points).reshape(len(own), n_layers, 2)
    got = np.array([[[p["x"], p["y"]] for p in data["trajectories"][str(i)]] for i in own])
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-4 * max(scale, 1.0))
    fam.record("trace", float(np.abs(got - want).max()))


# --- reading the prediction -------------------------------------------------------------------

def test_lens_grid_matches_hf(fam):
    ids = ids_of(fam.client, TEXT)
    ref = hf_forward(fam, ids)
    with torch.inference_mode():
        lens = hf_readout(fam.hf, ref["hidden"]).double().softmax(-1)
    target = int(lens[-1, -1].argmax())
    body = ok(fam.client.post("/lens", json={"text": TEXT, "target": target, "top_k": 3}))
    want = lens[:, :, target].numpy()
    got = np.array(body["target"]["probability"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-8)
    assert body["target"]["rank"][-1][-1] == 1
    top = np.array([[cell[0]["probability"] for cell in row] for row in body["top"]])
    np.testing.assert_allclose(top, lens.max(-1).values.numpy(), rtol=1e-4)
    fam.record("lens", max(float((np.abs(got - want) / want).max()),
                           float((np.abs(top - lens.max(-1).values.numpy()) / top).max())))


@causal_families
def test_score_matches_hf_logprobs(fam):
    texts = [TEXT, CLEAN]
    body = ok(fam.client.post("/score", json={"texts": texts, "top_k": 3}))
    worst = 0.0
    for text, r in zip(texts, body["results"]):
        ids = ids_of(fam.client, text)
        assert r["token_ids"] == ids
        logp = hf_forward(fam, ids)["logits"].log_softmax(-1)
        want = [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert r["token_logprobs"][0] is None  # no prefix: BOS, or (no BOS) the first real token
        np.testing.assert_allclose(r["token_logprobs"][1:], want, atol=1e-5)
        worst = max(worst, float(np.abs(np.array(r["token_logprobs"][1:]) - want).max()))
        assert r["final"][0]["token_id"] == int(logp[-1].argmax())
    fam.record("score", worst)


@causal_families
def test_dla_adds_up_to_hf_logit_difference(fam):
    ids = ids_of(fam.client, CLEAN)
    logits = hf_forward(fam, ids)["logits"][-1]
    with torch.inference_mode():
        hidden = hf_forward(fam, ids)["hidden"][-1, -1]
        uncapped = hf_readout(fam.hf, hidden, softcap=False).double()  # DLA decomposes before the soft-cap
    target = pair_ids(fam)
    got = ok(fam.client.post("/dla", json={"text": CLEAN, "answer": " Mary", "distractor": " John"}))
    parts = got["embed"] + sum(got["attn"]) + sum(got["mlp"]) + got["bias"]
    assert parts == pytest.approx(got["total"], abs=1e-5)
    for l in range(len(got["attn"])):
        assert sum(got["heads"][l]) + got["attn_bias"][l] == pytest.approx(got["attn"][l], abs=1e-5)
    assert np.array(got["heads"]).shape == (len(got["attn"]), fam.hf.config.num_attention_heads)
    assert got["total"] == pytest.approx(metric(uncapped, target), abs=1e-4)
    assert got["model_metric"] == pytest.approx(metric(logits, target), abs=1e-4)
    fam.record("dla", max(abs(got["total"] - metric(uncapped, target)), abs(got["model_metric"] - metric(logits, target))))


# --- causal interventions ---------------------------------------------------------------------

@causal_families
def test_patch_matches_hf_hooks(fam):
    clean, corrupt = ids_of(fam.client, CLEAN), ids_of(fam.client, CORRUPT)
    target = pair_ids(fam)
    source = fam.patcher.capture(clean, ("resid_pre", "z"))
    worst = 0.0
    for site in ("resid_pre", "heads"):
        body = ok(fam.client.post("/patch", json={**PAIR, "site": site}))
        want = fam.patcher.grid(site, corrupt, source, lambda logits: metric(logits, target))
        got = np.array(body["effect"])
        np.testing.assert_allclose(got, want, atol=1e-4)
        worst = max(worst, float(np.abs(got - want).max()))
        assert body["clean_metric"] == pytest.approx(metric(hf_forward(fam, clean)["logits"][-1], target), abs=1e-4)
    fam.record("patch", worst)


@causal_families
def test_causal_trace_clean_and_restored_probabilities(fam):
    body = ok(fam.client.post("/causal_trace", json={"text": CLEAN, "subject": "Mary and John", "samples": 2,
                                                     "answer": " Mary"}))
    ids = ids_of(fam.client, CLEAN)
    first = body["subject_positions"][0]
    assert body["tokens"][first].strip() == "Mary"
    answer = pair_ids(fam)["answer"]
    want = float(hf_forward(fam, ids)["logits"][-1].softmax(-1)[answer])
    assert body["clean_prob"] == pytest.approx(want, rel=1e-4)
    scores = np.array(body["scores"])
    # restoring the whole clean stream after the last block's input position restores the clean answer
    np.testing.assert_allclose(scores[-1, -1], body["clean_prob"], rtol=1e-4)
    assert np.all(scores[:, :first].astype(np.float32) == np.float32(body["corrupt_prob"]))  # before the subject: untouched
    fam.record("causal_trace", abs(body["clean_prob"] - want))


@causal_families
def test_ablate_matches_hf_hooks(fam):
    ids = ids_of(fam.client, CLEAN)
    target = pair_ids(fam)
    body = ok(fam.client.post("/ablate", json={"text": CLEAN, "answer": " Mary", "distractor": " John",
                                               "method": "zero"}))
    p = fam.patcher
    baseline = metric(hf_forward(fam, ids)["logits"][-1], target)

    def zero_head(h):
        def fn(t):
            t[0, :, h * p.d_head:(h + 1) * p.d_head] = 0
            return t
        return fn

    want = np.array([[p.metric_with(ids, "z", l, zero_head(h), lambda x: metric(x, target)) - baseline
                      for h in range(p.n_heads)] for l in range(len(p.blocks))])
    np.testing.assert_allclose(body["effect"], want, atol=1e-4)
    assert body["baseline"] == pytest.approx(baseline, abs=1e-4)
    fam.record("ablate", float(np.abs(np.array(body["effect"]) - want).max()))


@causal_families
def test_attribution_patch_matches_hf_autograd(fam):
    clean, corrupt = ids_of(fam.client, CLEAN), ids_of(fam.client, CORRUPT)
    target = pair_ids(fam)
    source = fam.patcher.capture(clean, ("resid_pre",))["resid_pre"]
    blocks = fam.patcher.blocks
    leaves: list[torch.Tensor] = []

    def add_leaf(module, args):
        leaves.append(torch.zeros_like(args[0], requires_grad=True))
        return (args[0] + leaves[-1],) + args[1:]

    handles = [b.register_forward_pre_hook(add_leaf) for b in blocks]
    inputs: list[torch.Tensor] = []
    keep = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()[0])) for b in blocks]
    try:
        with torch.enable_grad():
            logits = fam.hf(torch.tensor([corrupt])).logits[0, -1]
            grads = torch.autograd.grad(metric_tensor(logits, target), leaves)
    finally:
        for h in handles + keep:
            h.remove()
    want = np.array([((source[l] - inputs[l]) * grads[l][0]).sum(-1).numpy() for l in range(len(blocks))])
    body = ok(fam.client.post("/attribution_patch", json={**PAIR, "site": "resid_pre"}))
    got = np.array(body["attribution"])
    np.testing.assert_allclose(got, want, atol=1e-4)
    fam.record("attribution_patch", float(np.abs(got - want).max()))


@causal_families
def test_generate_greedy_matches_hf_generate(fam):
    """Greedy tokens equal HF `generate` (its KV cache, the family's position handling), and every
    step's logprob equals an HF forward of the final sequence."""
    answer = ok(fam.client.post("/generate", json={"prompt": TEXT, "max_new_tokens": 8, "alternatives": 3}))
    prompt = [t["token_id"] for t in answer["prompt"]]
    with torch.inference_mode():
        expected = fam.hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0].tolist()
        logprobs = fam.hf(torch.tensor([answer["token_ids"]])).logits[0].double().log_softmax(-1)
    assert answer["token_ids"] == expected
    worst = max(abs(s["logprob"] - float(logprobs[s["position"] - 1, s["token_id"]])) for s in answer["generated"])
    fam.record("/generate", worst)
    assert worst < 1e-4


@causal_families
def test_steering_matches_an_hf_hook(fam):
    """A vector added at block 1's input on every pass of a generation equals HF with a forward
    pre-hook adding it: each generated token is HF's greedy choice, with the same logprob."""
    vector = torch.randn(fam.hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    answer = ok(fam.client.post("/generate", json={"prompt": TEXT, "max_new_tokens": 6, "steer": [
        {"layer": 1, "vector": {"kind": "values", "values": vector.tolist()}, "coefficient": 3.0}]}))
    ids = answer["token_ids"]
    with hf_adding(fam.hf, 1, "resid_pre", 3.0 * vector[None].expand(len(ids), -1), list(range(len(ids)))), \
            torch.inference_mode():
        logprobs = fam.hf(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    worst = 0.0
    for step in answer["generated"]:
        row = logprobs[step["position"] - 1]
        assert int(row.argmax()) == step["token_id"]
        worst = max(worst, abs(step["logprob"] - float(row[step["token_id"]])))
    fam.record("/generate steer", worst)
    assert worst < 1e-4


@pytest.mark.parametrize("fam", list(FAMILIES), indirect=True)
def test_sae_features_and_edits_match_hf_on_the_familys_own_hook_widths(fam, tmp_path):
    """Random SAEs on block 1's residual input (d_model wide) and on its heads' values (hook_z:
    n_heads x d_head wide): features equal a plain-torch encoder on HF's activations; on a causal
    model, ablating a feature equals an HF hook doing the same edit; an encoder refuses the edit."""
    cfg = fam.model.cfg
    widths = {"blocks.1.hook_resid_pre": int(cfg.d_model),
              "blocks.1.attn.hook_z": int(cfg.n_heads) * int(cfg.d_head)}
    paths = {hook: str(write_random_sae(tmp_path / hook, d_in=width, d_sae=48, hook=hook, scale=1.0, seed=3))
             for hook, width in widths.items()}
    client = create_app({"TESTING": True, "SAES": [f"name={h},{p}" for h, p in paths.items()]},
                        model=fam.model).test_client()
    ids = ids_of(client, CLEAN)
    got = fam.patcher.capture(ids, ("resid_pre", "z"))
    answer = pair_ids(fam)["answer"] if fam.spec.causal else None
    for hook, path in paths.items():
        site = "z" if hook.endswith("hook_z") else "resid_pre"
        x = got[site][1].double()
        cfg_, params = reference_params(path)
        f, recon = reference_encode(cfg_, params, x)
        listed = ok(client.post("/features", json={"text": CLEAN, "sae": hook, "top_k": 48}))
        dense = torch.zeros_like(f)
        for p, tok in enumerate(listed["tokens"]):
            for a in tok["features"]:
                dense[p, a["index"]] = a["activation"]
        worst = float((dense - f).abs().max())
        fam.record(f"/features {site}", worst)
        assert worst < 1e-5 and (f > 0).any()
        index = int(f.sum(0).argmax())
        if not fam.spec.causal:
            assert "encoder" in client.post("/feature", json={"text": CLEAN, "sae": hook, "index": index,
                                                              "answer": 1, "edit": "ablate"}).get_json()["error"]
            continue
        body = ok(client.post("/feature", json={"text": CLEAN, "sae": hook, "index": index, "answer": answer,
                                                "edit": "ablate"}))
        g = f.clone()
        g[:, index] = 0
        delta = (reference_decode(cfg_, params, g, x) - recon).float()

        def replace(t: torch.Tensor) -> torch.Tensor:
            t[0] += delta.to(t.dtype)
            return t
        want = fam.patcher.metric_with(ids, site, 1, replace, lambda logits: logits.double().log_softmax(-1)[answer])
        worst = abs(body["edit"]["results"][0]["metric"] - want)
        fam.record(f"/feature ablate {site}", worst)
        assert worst < 1e-5 and abs(body["edit"]["results"][0]["effect"]) > 1e-6


def metric_tensor(logits: torch.Tensor, ids: dict[str, int]) -> torch.Tensor:
    return logits[ids["answer"]] - logits[ids["distractor"]]


@causal_families
def test_chg_ungated_loss_matches_hf_cross_entropy(fam):
    texts, targets = [CLEAN, TEXT], [" Mary", " on"]
    r = fam.client.post("/jobs/chg", json={"texts": texts, "targets": targets, "steps": 1})
    assert r.status_code == 202, r.get_json()
    state = wait_job(fam.client, r.get_json()["job"])
    assert state["status"] == "done", state
    tok = fam.model.tokenizer
    losses = []
    for text, t in zip(texts, targets):
        logp = hf_forward(fam, ids_of(fam.client, text))["logits"][-1].log_softmax(-1)
        losses.append(-float(logp[tok.encode(t, add_special_tokens=False)[0]]))
    want = float(np.mean(losses))
    result = state["result"]
    assert result["loss_ungated"] == pytest.approx(want, abs=1e-4)
    gates = np.array(result["gates"]["unregularized"])
    assert gates.shape == (fam.hf.config.num_hidden_layers, fam.hf.config.num_attention_heads)
    fam.record("chg", abs(result["loss_ungated"] - want))


# --- encoders ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fam", ENCODERS, indirect=True)
def test_encoder_predicts_the_masked_token_at_its_position(fam):
    text = "The cat [MASK] on the mat"
    tokens = ok(fam.client.post("/tokenize", json={"text": text}))["tokens"]
    position = next(t["index"] for t in tokens if t["token_str"] == "[MASK]")
    body = ok(fam.client.post("/predict", json={"text": text, "token_index": position, "top_k": 3}))
    assert body["objective"] == "masked" and body["token_str"] == "[MASK]"
    probs = hf_forward(fam, [t["token_id"] for t in tokens])["logits"][position].softmax(-1)
    last = body["predictions_by_layer"][-1]["top_tokens"]
    assert [t["token_id"] for t in last] == probs.topk(3).indices.tolist()
    np.testing.assert_allclose([t["probability"] for t in last], probs.topk(3).values.numpy(), rtol=1e-4)


@pytest.mark.parametrize("fam", ENCODERS, indirect=True)
@pytest.mark.parametrize("path,body", CAUSAL_ONLY, ids=[p for p, _ in CAUSAL_ONLY])
def test_encoder_refuses_next_token_endpoints(fam, path, body):
    r = fam.client.post(path, json=body)
    assert r.status_code == 400
    message = r.get_json()["error"]
    assert f"model {fam.model.name!r} is an encoder (bert" in message
    assert f"POST {path} needs a causal (next-token) model" in message


# --- loading ----------------------------------------------------------------------------------

def _http_error(status: int) -> Exception:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    url = "https://huggingface.co/meta-llama/Llama-3.2-1B/resolve/main/config.json"
    response = httpx2.Response(status, request=httpx2.Request("GET", url))
    try:
        raise HfHubHTTPError(f"{status} Client Error", response=response)
    except HfHubHTTPError as exc:
        try:  # as transformers wraps it
            raise OSError("We couldn't connect to the hub to load this model") from exc
        except OSError as wrapped:
            return wrapped


@pytest.mark.parametrize("make_error,gated", [
    (lambda: OSError("You are trying to access a gated repo.\nMake sure to have access to it at ..."), True),
    (lambda: _http_error(401), True),
    (lambda: _http_error(403), True),
    (lambda: _http_error(404), False),
    (lambda: OSError("meta-llama/Llama-3.2-1B does not appear to have a file named config.json"), False),
])
def test_gated_or_private_model_load_error_explains_hf_token(monkeypatch, make_error, gated):
    from transformer_lens.model_bridge import TransformerBridge

    from explorer.runtime.loading import ModelLoadError

    def refuse(*args, **kwargs):
        raise make_error()

    monkeypatch.setattr(TransformerBridge, "boot_transformers", refuse)
    # The hub answers (with a refusal): skip the offline start-up probe, whatever this machine's network.
    monkeypatch.setattr(loading, "hub_unreachable", lambda *args, **kwargs: None)
    with pytest.raises(ModelLoadError) as info:
        load_model("meta-llama/Llama-3.2-1B", device="cpu")
    message = str(info.value)
    assert ("HF_TOKEN" in message and "huggingface-cli login" in message) is gated
    assert "'meta-llama/Llama-3.2-1B'" in message
