"""Steering (issue 23): vectors added to the residual stream while the model writes equal an
independent Hugging Face forward hook adding the same vector at the same layer and positions; the
built vectors (ActAdd, mean difference) equal ones computed from HF hidden states; coefficient 0
is no steering at all; compare sets the unsteered completion beside the steered one with the KL
of their next-token distributions."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import err, hf_adding, ok

PROMPT = "I think that you are"
LAYER = 1


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def check_against_hf(hf_model, answer: dict, site: str, rows: torch.Tensor, positions: list[int]) -> None:
    """The steered sequence, teacher-forced through HF with the same addition: every generated token is
    HF's greedy choice at its prefix, with the same logprob."""
    with hf_adding(hf_model, LAYER, site, rows, positions):
        logprobs = hf_logprobs(hf_model, answer["token_ids"])
    for step in answer["generated"]:
        row = logprobs[step["position"] - 1]
        assert int(row.argmax()) == step["token_id"]
        assert step["logprob"] == pytest.approx(float(row[step["token_id"]]), abs=1e-4)


def direction(hf_model, seed: int = 0) -> torch.Tensor:
    return torch.randn(hf_model.config.hidden_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [1, 3, 9]])
def test_values_steering_equals_an_hf_hook(client, hf_model, site, positions):
    vector = direction(hf_model)
    body = {"prompt": PROMPT, "max_new_tokens": 8, "steer": [
        {"layer": LAYER, "site": site, "vector": {"kind": "values", "values": vector.tolist()},
         "coefficient": 4.0, "positions": positions}]}
    answer = ok(client.post("/generate", json=body))
    prompt, total = len(answer["prompt"]), len(answer["token_ids"])
    where = positions if isinstance(positions, list) else {
        "all": list(range(total)), "prompt": list(range(prompt)), "generated": list(range(prompt, total))}[positions]
    check_against_hf(hf_model, answer, site, 4.0 * vector[None].expand(len(where), -1), where)
    plain = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 8}))
    if positions != "generated":  # steering the prompt changes the first token's distribution at least
        assert answer["generated"][0]["logprob"] != plain["generated"][0]["logprob"]


def test_coefficient_zero_is_no_steering(client, hf_model):
    body = {"prompt": PROMPT, "max_new_tokens": 8}
    steered = ok(client.post("/generate", json={**body, "steer": [
        {"layer": LAYER, "vector": {"kind": "values", "values": direction(hf_model).tolist()}, "coefficient": 0}]}))
    assert steered.pop("steering")[0]["norm"] == 0
    assert steered == ok(client.post("/generate", json=body))


def hf_residual(hf_model, ids: list[int], layer: int) -> torch.Tensor:
    """resid_pre of block `layer`: HF's hidden_states[layer] (before the final norm for layer < n_layers)."""
    with torch.inference_mode():
        return hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]


def test_actadd_vector_equals_hf_and_steers_the_first_positions(client, hf_model, hf_tokenizer):
    positive, negative = "Love is all", "Hate"
    vector = ok(client.post("/steering_vector", json={
        "layer": LAYER, "vector": {"kind": "actadd", "positive": positive, "negative": negative}, "top_k": 5}))
    bos, space = hf_tokenizer.bos_token_id, hf_tokenizer.encode(" ")[0]
    pos = [bos] + hf_tokenizer.encode(positive)
    neg = [bos] + hf_tokenizer.encode(negative)
    neg += [space] * (len(pos) - len(neg))  # the shorter prompt padded with spaces on the right
    expected = hf_residual(hf_model, pos, LAYER) - hf_residual(hf_model, neg, LAYER)
    assert torch.allclose(torch.tensor(vector["values"]), expected, atol=1e-5)
    assert vector["norm"] == pytest.approx(expected.norm(dim=-1).tolist(), rel=1e-5)
    assert len(vector["tokens"]) == len(pos) and vector["tokens"][-1] == " all /  "
    # promoted and suppressed tokens: the sum of the rows through the (tied) unembedding
    logits = expected.sum(0) @ hf_model.lm_head.weight.T
    assert [t["token_id"] for t in vector["promotes"]] == logits.topk(5).indices.tolist()
    assert [t["token_id"] for t in vector["suppresses"]] == (-logits).topk(5).indices.tolist()
    answer = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "steer": [
        {"layer": LAYER, "vector": {"kind": "actadd", "positive": positive, "negative": negative},
         "coefficient": 5}]}))
    assert answer["steering"][0]["positions"] == f"first {len(pos)}"
    check_against_hf(hf_model, answer, "resid_pre", 5 * expected, list(range(len(pos))))


def test_mean_diff_vector_equals_hf(client, hf_model, hf_tokenizer):
    positive, negative = ["I love you", "What a joy"], ["I hate you", "What a pity", "Awful"]
    got = ok(client.post("/steering_vector", json={
        "layer": LAYER, "site": "resid_post", "unit": True, "coefficient": 2.0,
        "vector": {"kind": "mean_diff", "positive": positive, "negative": negative}}))
    bos = hf_tokenizer.bos_token_id

    def mean(texts: list[str]) -> torch.Tensor:  # resid_post of LAYER = resid_pre of LAYER + 1
        return torch.stack([hf_residual(hf_model, [bos] + hf_tokenizer.encode(t), LAYER + 1)[-1] for t in texts]).mean(0)
    expected = mean(positive) - mean(negative)
    expected = 2.0 * expected / expected.norm()
    assert torch.allclose(torch.tensor(got["values"]), expected, atol=1e-5)
    assert got["norm"] == pytest.approx(2.0, rel=1e-6) and got["tokens"] is None


def test_compare_sets_the_unsteered_completion_beside_with_the_kl(client, hf_model):
    vector = direction(hf_model, 1)
    steer = [{"layer": LAYER, "vector": {"kind": "values", "values": vector.tolist()}, "coefficient": 6.0}]
    body = {"prompt": PROMPT, "max_new_tokens": 6, "do_sample": True, "seed": 4}
    answer = ok(client.post("/generate", json={**body, "steer": steer, "compare": True}))
    steered = ok(client.post("/generate", json={**body, "steer": steer}))
    plain = ok(client.post("/generate", json=body))
    assert {k: v for k, v in answer.items() if k not in ("unsteered", "kl")} == steered
    assert answer["unsteered"] == {k: v for k, v in plain.items() if k != "prompt"}  # same seed
    ids = answer["token_ids"]
    with hf_adding(hf_model, LAYER, "resid_pre", 6.0 * vector[None].expand(len(ids), -1), list(range(len(ids)))):
        p = hf_logprobs(hf_model, ids)
    q = hf_logprobs(hf_model, ids)
    expected = [float((p[s["position"] - 1].exp() * (p[s["position"] - 1] - q[s["position"] - 1])).sum())
                for s in answer["generated"]]
    assert answer["kl"] == pytest.approx(expected, abs=1e-4) and min(answer["kl"]) > 0


@pytest.mark.parametrize("steer, message", [
    ([{"layer": 3, "vector": {"kind": "values", "values": [0.0] * 64}}], "steer[0].layer must be between 0 and 2, got 3"),
    ([{"layer": 0, "vector": {"kind": "values", "values": [0.0] * 3}}],
     "steer[0].vector.values must hold d_model = 64 numbers, got 3"),
    ([{"layer": 0, "vector": {"kind": "actadd", "positive": "a", "negative": "b"}, "positions": "all"}],
     "steer[0].positions: an actadd vector is added at the first positions"),
    ([{"layer": 0, "vector": {"kind": "values", "values": [0.0] * 64}, "positions": [70]}],
     "steer[0].positions[] must be between 0 and"),
    ([{"layer": 0, "vector": {"kind": "values", "values": [0.0] * 64}, "coefficient": 1e9}],
     "steer[0].coefficient must be a finite number with |coefficient| <= 1e+06"),
    ([{"layer": 0, "vector": {"kind": "mean_diff", "positive": [], "negative": ["a"]}}],
     "steer[0].vector.positive must hold between 1 and 64 texts, got 0"),
    ([{"layer": 0, "vector": {"kind": "nope"}}], "steer[0].vector: Input tag 'nope' found using 'kind'"),
    ([{"layer": "x", "vector": {"kind": "values", "values": []}}], "steer[0].layer must be an integer"),
    ([{"layer": 0, "vector": {"kind": "values", "values": "a"}}], "steer[0].vector.values must be a list of numbers"),
    ([{"layer": 0, "vector": {"kind": "actadd", "positive": "", "negative": "b"}}],
     "steer[0].vector.positive must be a non-empty string"),
    ([{"layer": 0, "vector": {"kind": "values", "values": []}, "extra": 1}],
     "unknown field 'steer[0].extra'; allowed fields: layer, site, vector, coefficient, unit, positions"),
    (["x"], "steer[] must be an object"),
    ([], "steer must hold between 1 and 8 additions, got 0"),
])
def test_invalid_steering_names_the_field(client, steer, message):
    assert err(client.post("/generate", json={"prompt": PROMPT, "steer": steer})).startswith(message)


def test_compare_needs_steer(client):
    assert err(client.post("/generate", json={"prompt": PROMPT, "compare": True})).startswith("compare needs steer")
