"""Shared fixtures: a tiny GPT-2 (real tokenizer, seeded random weights) saved to disk and loaded
through the same `load_model(DIR)` path as `python app.py --model DIR`, plus plain HF transformers
on the same weights as the independent reference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app import create_app
from explorer.math import forward as analysis
from model_utils import load_model, random_gpt2

TINY = {"n_layer": 3, "n_head": 4, "n_embd": 64, "n_positions": 64}
TEXT = "The cat sat on the mat"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gpt2")
    random_gpt2(str(path), seed=1234, **TINY).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    model = load_model(str(tiny_dir), device="cpu")
    cfg = model.cfg
    # Guard against a fixture that silently grew to full size.
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.n_ctx) == (3, 4, 64, 64)
    assert sum(p.numel() for p in model.bridge.parameters()) < 5_000_000
    return model


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny GPT-2's shape with other random weights: a second model to serve beside it."""
    path = tmp_path_factory.mktemp("tiny-gpt2-other")
    random_gpt2(str(path), seed=99, **TINY).save_pretrained(path)
    return load_model(str(path), device="cpu")


@pytest.fixture(scope="session")
def hf_model(tiny_dir: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(tiny_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture()
def app(tiny_model):
    app = create_app({"TESTING": True}, model=tiny_model)
    yield app
    # Each app has its own worker but the session shares one bridge, whose hooks are shared
    # state: a job still running after its test would edit the next test's forward passes.
    for job in list(app.extensions["jobs"]._jobs.values()):
        job.cancel()
    app.extensions["explorer"].worker.wait_idle(60)


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def calls(monkeypatch) -> dict[str, list]:
    """Counts every call of the functions that do model or PCA work (argument tuples, minus the first)."""
    log: dict[str, list] = {"forward": [], "lens_top_k": [], "trace_pca": []}
    for name in log:
        real = getattr(analysis, name)
        monkeypatch.setattr(analysis, name, lambda *a, _real=real, _log=log[name]: _log.append(a[1:]) or _real(*a))
    return log


def hf_reference(hf_model, ids: list[int]) -> dict[str, torch.Tensor]:
    """Plain HF forward on `ids`: block outputs, attentions, output probabilities, and the logit
    lens computed the textbook way, lm_head(ln_f(block output)) for every layer."""
    blocks = hf_model.transformer.h
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for b in blocks]
    try:
        with torch.inference_mode():
            out = hf_model(torch.tensor([ids]), output_attentions=True)
            hidden = torch.stack(outputs)[:, 0]  # [n_layers, seq, d_model] (HF's last hidden state has ln_f)
            lens = hf_model.lm_head(hf_model.transformer.ln_f(hidden)).softmax(-1)
    finally:
        for h in handles:
            h.remove()
    return {
        "attentions": torch.stack(out.attentions)[:, 0],  # [n_layers, n_heads, seq, seq]
        "probs": out.logits[0].softmax(-1),  # [seq, d_vocab]
        "hidden": hidden,
        "lens": lens,  # [n_layers, seq, d_vocab]
    }


def real_gpt2_available() -> bool:
    from huggingface_hub import try_to_load_from_cache

    for repo in ("openai-community/gpt2", "gpt2"):
        found = try_to_load_from_cache(repo, "model.safetensors")
        if isinstance(found, str) and os.path.exists(found):
            return True
    return False


IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
IOI_TARGET = {"answer": " Mary", "distractor": " John"}
# One valid request per POST endpoint (several sites and kinds of the causal ones), sized for TINY.
EVERY_ENDPOINT: list[tuple[str, dict]] = [
    ("/tokenize", {"text": TEXT}),
    ("/trace", {"text": TEXT}),
    ("/attention", {"text": TEXT, "layer": 1, "head": 2}),
    ("/attention", {"text": TEXT, "layer": 2}),
    ("/predict", {"text": TEXT, "token_index": 3, "top_k": 5}),
    ("/lens", {"text": TEXT, "target": " mat", "top_k": 3}),
    ("/score", {"texts": [TEXT, "The cat sat on the hat"], "top_k": 3}),
    ("/dla", {"text": TEXT, "answer": " mat", "distractor": " floor"}),
    *[("/patch", {"clean": IOI, "corrupt": IOI_CORRUPT, **IOI_TARGET, "site": site})
      for site in ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position")],
    *[("/causal_trace", {"text": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "kind": kind,
                         "samples": 3}) for kind in ("resid", "mlp", "attn")],
    ("/ablate", {"text": IOI, **IOI_TARGET}),
    ("/ablate", {"text": IOI, **IOI_TARGET, "method": "zero", "site": "mlp"}),
    ("/attribution_patch", {"clean": IOI, "corrupt": IOI_CORRUPT, **IOI_TARGET, "site": "heads", "compare": True}),
    ("/attribution_patch", {"clean": IOI, "corrupt": IOI_CORRUPT, "answer": " Mary", "site": "resid_pre"}),
    ("/jobs/chg", {"texts": [IOI, "When Tom and Anna went to the park, Anna gave a ball to"],
                   "targets": [" Mary", " Tom"], "steps": 3}),
]


def answer(client, path: str, body: dict, timeout: float = 120) -> dict:
    """The 200 answer of a POST, or for a job-only endpoint (202) its finished result."""
    import time

    r = client.post(path, json=body)
    assert r.status_code in (200, 202), (path, r.data[:300])
    if r.status_code == 200:
        return r.get_json()
    job, deadline = r.get_json()["job"], time.monotonic() + timeout
    while (state := client.get(f"/jobs/{job}").get_json())["status"] not in ("done", "error", "cancelled"):
        assert time.monotonic() < deadline, state
        time.sleep(0.02)
    assert state["status"] == "done", state
    return state["result"]


def max_diff(a, b, path: str = "") -> float:
    """Largest |a - b| over the numbers of two JSON values that must otherwise be equal (same
    keys, lengths, strings, ints)."""
    if isinstance(a, bool) or isinstance(a, str) or a is None:
        assert a == b, (path, a, b)
        return 0.0
    if isinstance(a, (int, float)):
        assert isinstance(b, (int, float)) and not isinstance(b, bool), (path, b)
        if isinstance(a, int) and isinstance(b, int) and not path.endswith(("logit", "probability")):
            assert a == b, (path, a, b)
        return abs(float(a) - float(b))
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        return max([max_diff(a[k], b[k], f"{path}.{k}") for k in a], default=0.0)
    assert isinstance(b, list) and len(a) == len(b), (path, len(a), len(b))
    return max([max_diff(x, y, f"{path}[]") for x, y in zip(a, b)], default=0.0)


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """(client, HF model) of a tiny GPT-2 whose next-token distributions are peaked."""
    from transformers import GPT2LMHeadModel

    from app import create_app
    from model_utils import load_model, random_gpt2

    path = tmp_path_factory.mktemp("peaked-gpt2")
    random_gpt2(str(path), seed=1234, initializer_range=0.4, **TINY).save_pretrained(path)
    model = load_model(str(path), device="cpu")
    assert model.cfg.n_layers == TINY["n_layer"] and model.cfg.d_model == TINY["n_embd"]
    hf = GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager").eval()
    return create_app({"TESTING": True}, model=model).test_client(), hf
