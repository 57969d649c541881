"""Token ids instead of texts (issue 23): every endpoint that reads one text or a clean/corrupt pair
answers the same (within the documented precision) to the texts' token ids (as /tokenize gives them, special tokens
included), and refuses both or neither with a 400 naming the fields."""
from __future__ import annotations

import pytest

from tests.helpers import EVERY_ENDPOINT, answer, assert_same_answer, err, ids_of

IDS_FIELDS = {"text": "token_ids", "clean": "clean_ids", "corrupt": "corrupt_ids"}
CASES = [(path, body) for path, body in EVERY_ENDPOINT if IDS_FIELDS.keys() & body.keys()]


@pytest.mark.parametrize("path, body", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_token_ids_answer_as_the_text(client, path, body):
    by_ids = {IDS_FIELDS.get(k, k): ids_of(client, v) if k in IDS_FIELDS else v for k, v in body.items()}
    assert_same_answer(answer(client, path, by_ids), answer(client, path, body))


def test_every_one_text_or_pair_endpoint_takes_ids():
    covered = {path for path, _ in CASES}
    assert covered == {"/tokenize", "/trace", "/attention", "/predict", "/lens", "/dla", "/patch",
                       "/causal_trace", "/ablate", "/attribution_patch"}


@pytest.mark.parametrize("path, body, message", [
    ("/patch", {"clean": "a", "clean_ids": [1], "corrupt": "b", "answer": 1, "site": "heads"},
     "give either clean or clean_ids, not both and not neither"),
    ("/patch", {"clean": "a", "answer": 1, "site": "heads"}, "give either corrupt or corrupt_ids"),
    ("/ablate", {"answer": 1}, "give either text or token_ids"),
    ("/causal_trace", {"token_ids": [50256, 99999], "subject": [1]},
     "token_ids[] must be token ids between 0 and 50256, got 99999"),
    ("/causal_trace", {"token_ids": [50256, 464, 3797], "subject": "dog"},
     "subject 'dog' occurs 0 times in text"),
])
def test_ids_errors_name_the_fields(client, path, body, message):
    assert err(client.post(path, json=body)).startswith(message)


def test_lists_of_texts_take_ids_too(client):
    from tests.helpers import CLEAN, TEXT

    texts = [TEXT, CLEAN]
    ids = [ids_of(client, t) for t in texts]
    assert_same_answer(answer(client, "/score", {"texts": [TEXT, ids[1]]}), answer(client, "/score", {"texts": texts}))
    assert_same_answer(answer(client, "/score", {"token_ids": ids[0]}), answer(client, "/score", {"text": TEXT}))
    ablate = {"text": CLEAN, "answer": " Mary", "site": "mlp"}
    assert_same_answer(answer(client, "/ablate", {**ablate, "reference_texts": [ids[0], TEXT + "!"]}),
                       answer(client, "/ablate", {**ablate, "reference_texts": [TEXT, TEXT + "!"]}))
    chg = {"targets": [" mat", " Mary"], "steps": 2}
    assert_same_answer(answer(client, "/jobs/chg", {**chg, "texts": ids}), answer(client, "/jobs/chg", {**chg, "texts": texts}))
    assert err(client.post("/score", json={"text": TEXT, "token_ids": ids[0]})).startswith(
        "give exactly one of text (one text), token_ids (one text's ids) and texts")
    assert err(client.post("/score", json={"texts": [[1, 99999]]})) == \
        "token_ids[] must be token ids between 0 and 50256, got 99999"


@pytest.mark.parametrize("path, body, message", [
    ("/patch", {"clean_ids": [50256, 99999], "corrupt": "a", "answer": 1, "site": "heads"},
     "clean_ids[] must be token ids between 0 and 50256, got 99999"),
    ("/attribution_patch", {"clean": "a b", "corrupt_ids": [], "answer": 1, "site": "heads"},
     "corrupt_ids must hold between 1 and 64 (n_ctx) token ids, got 0"),
    ("/predict", {"token_ids": [99999], "token_index": 0}, "token_ids[] must be token ids between 0 and 50256"),
])
def test_bad_ids_are_named_by_their_field(client, path, body, message):
    assert err(client.post(path, json=body)).startswith(message)
