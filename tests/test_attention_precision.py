"""/attention precision (issue 15): compact values keep float16's relative precision and never
turn a nonzero weight into 0; `"precision": "full"` returns the model's float32 pattern. Both are
checked against plain HF transformers (eager attention) on the same weights, on a short text and
on a ~1000-token text."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app import create_app
from explorer.math import forward as analysis
from explorer.operations import precision
from model_utils import load_model, random_gpt2
from tests.helpers import TEXT, hf_reference, ids_of, ok

# A model with a 1024-token context; the larger initializer spreads attention weights over many
# orders of magnitude (down to ~5e-8), the case that 4-decimal rounding zeroed.
LONG = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 1024, "initializer_range": 0.2}


def long_text(tokenizer, target: int = 1000) -> str:
    words = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs near "
             "an old river bank and sang about Paris , Rome , 1999 ; tea ?").split()
    text, i = "", 0
    while len(tokenizer.encode(text)) < target - 5:
        text += " " + words[(i * 7) % len(words)]
        i += 1
    return text.strip()


@pytest.fixture(scope="module")
def long_setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import GPT2LMHeadModel

    path: Path = tmp_path_factory.mktemp("long-gpt2")
    random_gpt2(str(path), seed=7, **LONG).save_pretrained(path)
    model = load_model(str(path), device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    client = create_app({"TESTING": True}, model=model).test_client()
    text = long_text(model.tokenizer)
    return client, hf, text


def reference(client, hf, text: str) -> tuple[list[int], torch.Tensor]:
    ids = ids_of(client, text)
    return ids, hf_reference(hf, ids)["attentions"].double()  # [n_layers, n_heads, seq, seq]


def layer_matrix(client, text: str, layer: int, **extra) -> np.ndarray:
    body = ok(client.post("/attention", json={"text": text, "layer": layer, **extra}))
    return np.array(body["attention_matrix"], dtype=np.float64)


def check_compact(got: np.ndarray, ref: np.ndarray) -> None:
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - (1e-3 * ref + 1e-7)), ref.shape)
    assert np.all(err <= 1e-3 * ref + 1e-7), f"at {worst}: got {got[worst]!r}, model {ref[worst]!r}"
    assert not np.any((ref > 0) & (got == 0)), "a nonzero weight came back as 0"
    assert np.all(got[ref == 0] == 0), "a masked position came back nonzero"
    assert np.abs(got.sum(-1) - 1).max() <= 1e-3


def check_full(got: np.ndarray, ref: np.ndarray) -> None:
    assert np.abs(got - ref).max() <= 1e-6
    assert np.abs(got.sum(-1) - 1).max() <= 1e-5


def test_short_text_compact_and_full(client, hf_model, tiny_model):
    _, ref = reference(client, hf_model, TEXT)
    for layer in range(int(tiny_model.cfg.n_layers)):
        check_compact(layer_matrix(client, TEXT, layer), ref[layer].numpy())
        check_full(layer_matrix(client, TEXT, layer, precision="full"), ref[layer].numpy())
        one = layer_matrix(client, TEXT, layer, head=1, precision="full")
        np.testing.assert_array_equal(one, layer_matrix(client, TEXT, layer, precision="full")[1])


def test_long_text_compact_and_full(long_setup):
    client, hf, text = long_setup
    ids, ref = reference(client, hf, text)
    assert 990 <= len(ids) <= 1024
    tiny = 0
    for layer in range(LONG["n_layer"]):
        r = ref[layer].numpy()
        tiny += int(((r > 0) & (r < 5e-5)).sum())  # what 4-decimal rounding turned into 0
        check_compact(layer_matrix(client, text, layer), r)
        check_full(layer_matrix(client, text, layer, precision="full"), r)
    assert tiny > 1000, "the text must exercise small weights"


def test_store_pattern_keeps_tiny_weights_nonzero():
    weights = torch.tensor([0.0, 1e-45, 1e-30, 1e-13, 1e-10, 3e-8, 1e-5, 0.5, 1.0])
    out = torch.empty(weights.shape, dtype=torch.float16)
    analysis.store_pattern(out, weights)
    run = analysis.Run(token_ids=torch.zeros(1), resid=torch.zeros(1, 1, 1), patterns=out.view(1, 1, 1, -1))
    got = precision.attention_weights(run.patterns[0, 0])[0]
    assert got[0] == 0 and np.all(got[1:] > 0)
    assert np.all(np.abs(got - weights.double().numpy()) <= 1e-3 * weights.double().numpy() + 1e-11)


def test_significant_rounds_to_digits_not_decimals():
    assert precision.significant(0.000123456, 4) == 0.0001235
    assert precision.significant(123456.0, 4) == 123500.0
    assert precision.significant(0.0, 4) == 0.0


def test_precision_is_validated_and_documented(client):
    r = client.post("/attention", json={"text": TEXT, "layer": 0, "precision": "exact"})
    assert r.status_code == 400
    message = r.get_json()["error"]
    assert "precision" in message and "'compact'" in message and "'full'" in message
    spec = client.get("/openapi.json").get_json()
    body = spec["paths"]["/attention"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
    assert schema["properties"]["precision"]["default"] == "compact"
