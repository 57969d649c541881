"""Shared fixtures: a tiny GPT-2 (real tokenizer, seeded random weights) saved to disk and loaded
through the same `load_model(DIR)` path as `python app.py --model DIR`, plus plain HF transformers
on the same weights as the independent reference."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from app import create_app
from explorer.math import forward as analysis
from model_utils import load_model, random_gpt2
from tests.helpers import TINY, HFPatcher


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


@pytest.fixture(scope="session")
def hf_patcher(hf_model) -> HFPatcher:
    return HFPatcher(hf_model)


@pytest.fixture()
def app(tiny_model, tmp_path):
    # Fitted Jacobian lenses go to this test's directory and onto this app's copy of the model only.
    app = create_app({"TESTING": True, "JLENS_DIR": str(tmp_path / "jlens")},
                     model=dataclasses.replace(tiny_model, lenses={}))
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
