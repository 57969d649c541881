"""POST /generate (issue 23): greedy tokens equal Hugging Face `generate`; every step's
log-probability, entropy and alternatives equal an HF forward of the final sequence; a seed
reproduces a sampled completion; the samplers equal HF's logits warpers; stop strings and EOS
end where they should; streaming sends each token as it is made and stops when the client leaves."""
from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch

from explorer.math import generation
from explorer.math.generation import Sampling, filtered
from explorer.operations.generate import stop_in_tail
from explorer.runtime.loading import LoadedModel
from tests.helpers import TEXT, assert_same_answer, err, ok, unstamped, wait_job, waitress_serving

PROMPT = "The cat sat on the"


def hf_generate(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                                eos_token_id=None)
    return out[0].tolist()


def check_steps_against_hf(hf_model, answer: dict) -> None:
    """Each generated token's logprob, entropy and alternatives against an HF forward of the
    final sequence (the distribution at the position before it)."""
    ids = answer["token_ids"]
    with torch.inference_mode():
        logprobs = hf_model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    for step in answer["generated"]:
        row = logprobs[step["position"] - 1]
        assert ids[step["position"]] == step["token_id"]
        assert step["logprob"] == pytest.approx(float(row[step["token_id"]]), abs=1e-4)
        assert step["entropy"] == pytest.approx(float(-(row.exp() * row).sum()), abs=1e-4)
        top = row.topk(len(step["alternatives"]))
        assert [a["token_id"] for a in step["alternatives"]] == top.indices.tolist()
        assert [a["probability"] for a in step["alternatives"]] == pytest.approx(top.values.exp().tolist(),
                                                                                rel=1e-4)


def test_greedy_equals_hf_generate(client, hf_model):
    answer = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 12}))
    prompt = [t["token_id"] for t in answer["prompt"]]
    assert answer["token_ids"] == hf_generate(hf_model, prompt, 12)
    assert answer["finish_reason"] == "length" and len(answer["generated"]) == 12
    assert [s["position"] for s in answer["generated"]] == list(range(len(prompt), len(prompt) + 12))
    check_steps_against_hf(hf_model, answer)
    tok = client.application.extensions["explorer"].model.tokenizer
    assert answer["text"] == tok.decode(answer["token_ids"], skip_special_tokens=True)
    assert answer["completion"] == tok.decode(answer["token_ids"][len(prompt):], skip_special_tokens=True)


def test_prompt_ids_are_taken_as_given(client):
    by_text = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4}))
    ids = [t["token_id"] for t in by_text["prompt"]]
    assert ok(client.post("/generate", json={"prompt_ids": ids, "max_new_tokens": 4})) == by_text
    no_bos = ok(client.post("/generate", json={"prompt_ids": ids[1:], "max_new_tokens": 4}))
    assert no_bos["token_ids"][:len(ids) - 1] == ids[1:]  # no BOS added


def test_a_seed_reproduces_a_sampled_completion(client):
    body = {"prompt": PROMPT, "max_new_tokens": 16, "do_sample": True, "temperature": 1.5, "seed": 11}
    first, again = (ok(client.post("/generate", json=body)) for _ in range(2))
    assert first == again
    other = ok(client.post("/generate", json={**body, "seed": 12}))
    assert other["token_ids"] != first["token_ids"]  # 16 draws from a near-uniform distribution
    # top_k 1 leaves only the most likely token: sampling is then greedy
    greedy = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 16}))
    assert ok(client.post("/generate", json={**body, "top_k": 1}))["token_ids"] == greedy["token_ids"]


@pytest.mark.parametrize("settings", [
    Sampling(True, temperature=0.7), Sampling(True, top_k=5), Sampling(True, top_p=0.3),
    Sampling(True, temperature=2.0, top_k=50, top_p=0.9), Sampling(True, top_p=1.0),
])
def test_samplers_equal_hf_logits_warpers(settings):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_k is not None:
        warpers.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p is not None:
        warpers.append(TopPLogitsWarper(settings.top_p))
    expected = warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    assert torch.equal(filtered(logits, settings), expected)


def test_stop_strings_and_eos_end_where_they_should(client, monkeypatch):
    body = {"prompt": PROMPT, "max_new_tokens": 10, "do_sample": True, "seed": 5}  # sampled: varied tokens
    full = ok(client.post("/generate", json=body))
    third = full["generated"][2]
    stop = third["token"]  # completed by the third token, not contained in the first two
    assert stop not in full["generated"][0]["token"] + full["generated"][1]["token"]
    stopped = ok(client.post("/generate", json={**body, "stop": ["zzz", stop]}))
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == full["token_ids"][:third["position"] + 1]
    # the model's end-of-sequence token: the generation ends with it, kept as the last token
    monkeypatch.setattr(LoadedModel, "eos_token_ids", property(lambda self: frozenset([third["token_id"]])))
    ended = ok(client.post("/generate", json=body))
    assert ended["finish_reason"] == "eos" and ended["token_ids"] == stopped["token_ids"]


STOP_TEXTS = (" déjà vu 😀🐍 naïve 東京 ok.\n\n 's x", "😀 the end, 🐍!")


def sentencepiece_tokenizer():
    """A Llama-style tokenizer (SentencePiece BPE with byte fallback; its decoder drops the text's
    leading space): a few letters and merges, every other character as UTF-8 byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("e", "n"), ("▁", "x")]
    for token in [*"▁abcdefghijklmnopqrstuvwxyz.,'!", *(a + b for a, b in merges)]:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece"])
def test_stop_check_decodes_a_bounded_tail_and_finds_what_the_whole_text_would(app, kind):
    """The first step at which stop_in_tail finds a stop string is the first at which the whole
    decoded completion contains one: stop strings spanning token boundaries, multi-byte characters
    split across byte tokens, a special token (decoded to nothing) in between."""
    tok = app.extensions["explorer"].model.tokenizer if kind == "gpt2" else sentencepiece_tokenizer()
    first_part, second_part = (tok.encode(t, add_special_tokens=False) for t in STOP_TEXTS)
    ids = first_part + [tok.eos_token_id] + second_part
    lengths = []

    def decode(part):
        lengths.append(len(part))
        return tok.decode(part, skip_special_tokens=True)
    text = decode(ids)
    assert sum("\ufffd" in decode([i]) for i in ids) >= 4  # multi-byte characters cut across tokens

    def first(found) -> int | None:
        return next((k for k in range(1, len(ids) + 1) if found(ids[:k])), None)

    stops = [[text[i:i + n]] for n in (1, 2, 3, 5, 8) for i in range(len(text) - n + 1)]
    stops += [["\ufffd"], ["zzz", "東京"], ["😀 the"], [" 's"], ["x😀"], [" d"]]
    for stop in stops:
        assert first(lambda p: stop_in_tail(decode, p, stop)) == first(lambda p: any(s in decode(p) for s in stop)), stop
    assert first(lambda p: stop_in_tail(decode, p, ["zzz"])) is None
    # a long completion and a short stop string: a tail of tokens is decoded, never the whole
    lengths.clear()
    long = ids * 4
    assert not stop_in_tail(decode, long, ["zzz"]) and max(lengths) < len(long) // 4


@pytest.mark.parametrize("body, message", [
    ({}, "give either prompt (a text) or prompt_ids (token ids), not both and not neither"),
    ({"prompt": "a", "prompt_ids": [1]}, "give either prompt"),
    ({"prompt_ids": []}, "prompt_ids must hold between 1 and 64 (n_ctx) token ids, got 0"),
    ({"prompt_ids": [1, 50257]}, "prompt_ids[] must be token ids between 0 and 50256, got 50257"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens must be between 1 and 1024, got 0"),
    ({"prompt": "a", "max_new_tokens": 63}, "the prompt is 2 tokens and max_new_tokens 63: together over the "
                                            "model's context of 64 tokens (n_ctx); ask for at most 62 new tokens"),
    ({"prompt": "a", "do_sample": True, "temperature": 0}, "temperature must be above 0 and at most 100, got 0"),
    ({"prompt": "a", "do_sample": True, "top_p": 1.5}, "top_p must be above 0 and at most 1, got 1.5"),
    ({"prompt": "a", "do_sample": True, "top_k": 0}, "top_k must be at least 1, got 0"),
    ({"prompt": "a", "temperature": 0.5}, "temperature, top_k and top_p apply only with do_sample: true"),
    ({"prompt": "a", "alternatives": 21}, "alternatives must be between 0 and 20, got 21"),
    ({"prompt": "a", "stop": [""]}, "stop must not contain an empty string"),
    ({"prompt": "a", "stop": []}, "stop must hold between 1 and 16 strings, got 0"),
    ({"prompt": "a", "seed": -1}, "seed must be between 0 and"),
    ({"prompt": "a", "stream": True, "async": True}, "stream and async exclude each other"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
])
def test_invalid_requests_name_the_field(client, body, message):
    assert err(client.post("/generate", json=body)).startswith(message)


def test_async_equals_sync(client):
    body = {"prompt": PROMPT, "max_new_tokens": 6}
    r = client.post("/generate", json={**body, "async": True})
    assert r.status_code == 202
    state = wait_job(client, r.get_json()["job"])
    assert state["status"] == "done" and unstamped(state["result"]) == ok(client.post("/generate", json=body))


def events(data: bytes) -> list[tuple[str, dict]]:
    """Server-sent events as (event, data) pairs."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_stream_sends_every_token_then_the_answer(client):
    body = {"prompt": PROMPT, "max_new_tokens": 5}
    r = client.post("/generate", json={**body, "stream": True, "provenance": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    sent = events(r.data)
    answer = ok(client.post("/generate", json=body))
    assert [kind for kind, _ in sent] == ["progress"] * 5 + ["result"]
    assert [data["token"] for _, data in sent[:-1]] == answer["generated"]
    assert [data["generated"] for _, data in sent[:-1]] == [1, 2, 3, 4, 5]
    result = sent[-1][1]
    assert result.pop("provenance")["endpoint"] == "/generate" and result == answer


def test_stream_reports_an_error_as_an_event(client, monkeypatch):
    def broken(self, forced=None):
        raise RuntimeError("boom")
    monkeypatch.setattr(generation.Decoder, "step", broken)
    sent = events(client.post("/generate", json={"prompt": PROMPT, "stream": True}).data)
    assert sent == [("error", {"error": "internal error (details are in the server log)"})]


@pytest.fixture()
def slow_steps(monkeypatch) -> list[tuple[float, float]]:
    """Every Decoder.step takes at least 0.3 s; the (start, end) time of each is recorded."""
    times: list[tuple[float, float]] = []
    step = generation.Decoder.step

    def slow(self, forced=None):
        start = time.monotonic()
        out = step(self, forced)
        time.sleep(0.3)
        times.append((start, time.monotonic()))
        return out
    monkeypatch.setattr(generation.Decoder, "step", slow)
    return times


def open_stream(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return response


def test_the_first_event_arrives_before_the_second_token_is_made(app, slow_steps):
    """Over waitress (the production server): no output buffering holds the first token back."""
    with waitress_serving(app, channel_request_lookahead=4) as server:
        response = open_stream(server.effective_port, {"prompt": PROMPT, "max_new_tokens": 4, "stream": True})
        first = response.readline()
        arrived = time.monotonic()
        assert first == b"event: progress\n"
        rest = response.read()
    assert len(slow_steps) == 4 and arrived < slow_steps[1][1]
    assert b"event: result" in rest


def test_a_client_that_leaves_stops_the_generation(app, slow_steps):
    with waitress_serving(app, channel_request_lookahead=4) as server:
        response = open_stream(server.effective_port, {"prompt": PROMPT, "max_new_tokens": 40, "stream": True})
        response.readline()
        response.close()  # the client disconnects after its first token
        left = time.monotonic()
        ex = app.extensions["explorer"]
        deadline = time.monotonic() + 10
        while ex.worker.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        done = len(slow_steps)
        assert done < 10, f"{done} steps ran"  # stopped within a step or two of the disconnect
        assert all(start < left + 0.7 for start, _ in slow_steps)  # no step began well after it


def test_other_requests_are_served_between_steps(app, slow_steps):
    client = app.test_client()
    answers: list[int] = []
    long = threading.Thread(target=lambda: answers.append(
        client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 10}).status_code))
    long.start()
    deadline = time.monotonic() + 30
    while not slow_steps and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slow_steps, "the generation did not start"
    started = time.monotonic()
    assert client.post("/predict", json={"text": TEXT + " again", "token_index": 1}).status_code == 200
    waited = time.monotonic() - started
    long.join(30)
    assert answers == [200] and waited < 2.0  # one step (0.3 s) and its own pass, not ten steps


def test_watched_tokens_report_their_probability_at_every_step(client, hf_model):
    answer = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 5, "watch": [" mat", 464]}))
    with torch.inference_mode():
        probs = hf_model(torch.tensor([answer["token_ids"]])).logits[0].double().softmax(-1)
    mat = client.application.extensions["explorer"].encode(" mat")[0]
    for step in answer["generated"]:
        row = probs[step["position"] - 1]
        assert [w["token_id"] for w in step["watched"]] == [mat, 464]
        assert [w["probability"] for w in step["watched"]] == pytest.approx([float(row[mat]), float(row[464])],
                                                                            rel=1e-4)
    assert "watched" not in ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 1}))["generated"][0]
    assert err(client.post("/generate", json={"prompt": PROMPT, "watch": [" Eiffel Tower"]})).startswith(
        "watch[0] ' Eiffel Tower' is 4 tokens")


def test_the_generated_sequence_is_cached_for_the_other_endpoints(client, hf_model):
    """/generate's token_ids go to any endpoint as they are, answered from the run cached at idle
    time, equal to a fresh forward of the unsteered model."""
    answer = ok(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "steer": [
        {"layer": 1, "vector": {"kind": "values", "values": [1.0] * 64}, "coefficient": 3}]}))
    ids = answer["token_ids"]
    ex = client.application.extensions["explorer"]
    ex.worker.wait_idle(30)
    deadline = time.monotonic() + 10
    while ex.cache.get(("run", tuple(ids))) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    computed = ex.cache.stats()["computations"]
    attention = ok(client.post("/attention", json={"token_ids": ids, "layer": 1}))  # compact: the run's patterns
    assert ex.cache.stats()["computations"] == computed  # read from the cached run
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids]), output_attentions=True).attentions[1][0]
    # compact precision (API.md): within 1e-3 x weight + 1e-7
    assert torch.allclose(torch.tensor(attention["attention_matrix"], dtype=torch.float64), expected.double(),
                          rtol=1e-3, atol=1e-7)
    tokens = ok(client.post("/tokenize", json={"token_ids": ids}))["tokens"]
    assert [t["token_id"] for t in tokens] == ids  # no BOS added in front of the prompt's own
    by_text = ok(client.post("/predict", json={"text": PROMPT, "token_index": 3}))
    assert_same_answer(ok(client.post("/predict", json={"token_ids": ids, "token_index": 3})), by_text)
