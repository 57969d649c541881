"""Shared fixtures: a tiny GPT-2 (real tokenizer, seeded random weights) saved to disk and loaded
through the same `load_model(DIR)` path as `python app.py --model DIR`, plus plain HF transformers
on the same weights as the independent reference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from app import create_app
from explorer import analysis
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
