"""Checks on the real GPT-2 weights; skipped unless they are in the Hugging Face cache."""
from __future__ import annotations

import pytest

from tests.helpers import TEXT, ids_of, real_gpt2_available

pytestmark = [pytest.mark.gpt2,
              pytest.mark.skipif(not real_gpt2_available(), reason="real GPT-2 weights are not cached")]


@pytest.fixture(scope="module")
def gpt2_client():
    import os

    from app import create_app
    from model_utils import load_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # use the cached copy, never the network
    return create_app(model=load_model("gpt2", device="cpu")).test_client()


def test_token_ids(gpt2_client):
    assert ids_of(gpt2_client, TEXT) == [50256, 464, 3797, 3332, 319, 262, 2603]


def test_logit_lens_first_and_last_layer(gpt2_client):
    r = gpt2_client.post("/predict", json={"text": TEXT, "token_index": 5})
    assert r.status_code == 200
    layers = r.get_json()["predictions_by_layer"]
    assert len(layers) == 12
    assert layers[-1]["top_tokens"][0]["token"] == " floor"
    assert layers[0]["top_tokens"][0]["token"] == " same"
