"""The Jacobian lens (`"lens": "jacobian"` on /lens and /predict, `--jlens`, POST /jobs/jlens_fit,
the `jlens` steering vector) against TransformerLens' own `JacobianLens` on tiny models with
lenses fitted here: an identity lens is the logit lens exactly; a fitted lens's every cell is the
library's `readout`; the job's lens is the library's `fit`; a saved lens loads back the same."""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis import JacobianLens

from app import create_app
from explorer.runtime import jlens
from explorer.runtime.loading import ModelLoadError
from model_utils import load_model
from tests.families import FAMILIES, build
from tests.helpers import CORPUS, FACT, TEXT, err, ok, wait_job

# Each long enough for the fit (the library skips the first 16 positions and the last).
GRID_TEXT = FACT + " Paris, and the river that runs through it is"
TOL = 1e-5


def fresh(model):
    """The model with no lens loaded (the session's model is shared by every test)."""
    return dataclasses.replace(model, lenses={})


def fitted(bridge, texts=CORPUS, **options) -> JacobianLens:
    return JacobianLens.fit(bridge, texts, corpus="tests", show_progress=False, **options)


def with_lens(model, lens: JacobianLens, name: str = "test") -> None:
    model.lenses[name] = jlens.LoadedLens(name, lens, {"kind": "file", "path": "(in memory)", "sha256": ""})


@pytest.fixture()
def jmodel(app):
    """The test app's model: its own lenses (none yet), saved under tmp_path / "jlens" (conftest)."""
    return app.extensions["explorer"].model


@pytest.fixture(scope="module")
def tiny_lens(tiny_model) -> JacobianLens:
    return fitted(tiny_model.bridge)


def grid(client, text: str = GRID_TEXT, **fields) -> dict:
    return ok(client.post("/lens", json={"text": text, "top_k": 5, "target": " Paris", **fields}))


def without_lens(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("lens", "artifact")}


# --- the grid ---------------------------------------------------------------------------------

def test_identity_lens_is_the_logit_lens_exactly(client, jmodel):
    d_model, n_layers = jmodel.cfg.d_model, jmodel.cfg.n_layers
    with_lens(jmodel, JacobianLens({l: torch.eye(d_model) for l in range(n_layers - 1)}, n_prompts=1,
                                   d_model=d_model))
    logit = grid(client)
    jacobian = grid(client, lens="jacobian")
    assert jacobian["lens"] == "jacobian" and jacobian["artifact"]["name"] == "test"
    assert without_lens(jacobian) == logit  # every number, exactly
    assert grid(client, lens="logit") == {"lens": "logit", **logit}
    body = {"text": GRID_TEXT, "token_index": 5, "top_k": 7}
    assert without_lens(ok(client.post("/predict", json={**body, "lens": "jacobian"}))) == \
        ok(client.post("/predict", json=body))


def test_fitted_lens_cells_equal_the_library_readout(client, jmodel, tiny_lens):
    with_lens(jmodel, tiny_lens)
    bridge, n_layers = jmodel.bridge, jmodel.cfg.n_layers
    answer = grid(client, lens="jacobian")
    ids = [t["token_id"] for t in ok(client.post("/tokenize", json={"text": GRID_TEXT}))["tokens"]]
    ref = tiny_lens.readout(bridge, torch.tensor([ids]), top_k=5, return_full_logits=True)
    logits = torch.stack([ref.lens_logits[l] for l in range(n_layers)]).double()  # [n_layers, seq, d_vocab]
    logp = logits.log_softmax(-1)
    p = logp.exp()
    target = answer["target"]["token_id"]
    assert target == bridge.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    probs = [[[t["probability"] for t in cell] for cell in row] for row in answer["top"]]
    top_ids = [[[t["token_id"] for t in cell] for cell in row] for row in answer["top"]]
    assert np.array_equal(top_ids, torch.stack([ref.lens_topk_indices[l] for l in range(n_layers)]).numpy())
    assert np.allclose(probs, p.topk(5, -1).values.numpy(), atol=TOL, rtol=0)
    assert np.allclose(answer["entropy"], -(p * logp).sum(-1).numpy(), atol=TOL, rtol=0)
    assert np.allclose(answer["kl_to_final"], (p[-1] * (logp[-1] - logp)).sum(-1).numpy(), atol=TOL, rtol=0)
    assert np.allclose(answer["target"]["probability"], p[..., target].numpy(), atol=TOL, rtol=0)
    assert np.array_equal(answer["target"]["rank"], (logits > logits[..., target:target + 1]).sum(-1).numpy() + 1)
    # the last layer is the model's own output, and the lens moved the layers below it
    model_p = ref.model_logits.double().softmax(-1)
    assert np.allclose([[t["probability"] for t in cell] for cell in answer["final"]],
                       model_p.topk(5, -1).values.numpy(), atol=TOL, rtol=0)
    logit = grid(client)
    assert answer["top"][:-1] != logit["top"][:-1] and answer["top"][-1] == logit["top"][-1]
    predicted = ok(client.post("/predict", json={"text": GRID_TEXT, "token_index": 4, "top_k": 3,
                                                  "lens": "jacobian"}))
    for layer in predicted["predictions_by_layer"]:
        row = logits[layer["layer"], 4]
        assert [t["token_id"] for t in layer["top_tokens"]] == row.topk(3).indices.tolist()
        assert np.allclose([t["logit"] for t in layer["top_tokens"]], row.topk(3).values.numpy(), atol=5e-5 + TOL)


def test_lens_choice_errors(client, jmodel, tiny_model):
    assert "no Jacobian lens is loaded" in err(client.post("/lens", json={"text": TEXT, "lens": "jacobian"}))
    assert "jlens" in err(client.post("/lens", json={"text": TEXT, "jlens": "x"}))
    assert "lens must be one of" in err(client.post("/lens", json={"text": TEXT, "lens": "tuned"}))
    with_lens(jmodel, fitted(tiny_model.bridge, source_layers=[0]), "partial")
    assert "every layer" in err(client.post("/predict", json={"text": TEXT, "token_index": 1, "lens": "jacobian"}))
    assert "'nope' is neither loaded nor saved" in err(client.post("/lens", json={"text": TEXT, "lens": "jacobian", "jlens": "nope"}))


# --- fitting as a job, saving and loading ------------------------------------------------------

def test_fit_job_equals_library_fit_and_is_usable_at_once(client, jmodel, tmp_path):
    r = client.post("/jobs/jlens_fit", json={"texts": CORPUS, "name": "mine"})
    assert r.status_code == 202, r.get_json()
    state = wait_job(client, r.get_json()["job"], timeout=300)
    assert state["status"] == "done", state
    result = state["result"]
    path = result["path"]
    assert path == str(tmp_path / "jlens" / "mine.pt") and result["texts"] == len(CORPUS)
    direct = JacobianLens.fit(jmodel.bridge, CORPUS, corpus=result["artifact"]["corpus"], show_progress=False,
                              max_seq_len=jmodel.cfg.n_ctx)  # the job caps its default (128) at n_ctx
    saved = JacobianLens.load(path)
    assert saved.source_layers == direct.source_layers and saved.n_prompts == direct.n_prompts == len(CORPUS)
    for layer in direct.source_layers:  # the artifact is float16, as the library saves it
        assert torch.equal(saved.jacobians[layer], direct.jacobians[layer].half().float())
    assert saved.metadata == direct.metadata
    # listed and usable at once, by name; the grid equals the library's readout of the saved lens
    assert [lens["name"] for lens in ok(client.get("/model"))["lenses"]] == ["mine"]
    answer = grid(client, lens="jacobian", jlens="mine")
    assert answer["artifact"]["source"]["path"] == path and answer["artifact"]["n_prompts"] == len(CORPUS)
    # save -> load: --jlens PATH serves the same lens, hence the same answer
    again = fresh(jmodel)
    jlens.attach([again], [path])
    assert list(again.lenses) == ["mine"]
    reloaded = create_app({"TESTING": True}, model=again).test_client()
    assert grid(reloaded, lens="jacobian") == answer
    # the name is taken now
    assert "taken" in err(client.post("/jobs/jlens_fit", json={"texts": CORPUS, "name": "mine"}))


def test_fit_job_reports_progress_and_cancels(client, jmodel, tmp_path):
    job = client.post("/jobs/jlens_fit", json={"texts": CORPUS * 20, "name": "cancelled"}).get_json()["job"]
    assert ok(client.delete(f"/jobs/{job}"))["status"] in ("cancelling", "cancelled")
    state = wait_job(client, job, timeout=120)
    assert state["status"] == "cancelled" and state["progress"] < 1
    assert "cancelled" not in jmodel.lenses and not (tmp_path / "jlens" / "cancelled.pt").exists()


@pytest.mark.parametrize("body, message", [
    ({"texts": CORPUS, "name": "a/b"}, "name must be"),
    ({"texts": [], "name": "x"}, "texts must hold between 1"),
    ({"texts": ["too short"], "name": "x"}, "texts[0] is"),
    ({"texts": CORPUS, "name": "x", "source_layers": [2]}, "source_layers[] must be between 0 and 1"),
    ({"texts": CORPUS, "name": "x", "source_layers": [0, 0]}, "duplicates"),
    ({"texts": CORPUS, "name": "x", "max_seq_len": 17}, "max_seq_len must be between 18 and 64"),
    ({"texts": CORPUS, "name": "x", "max_seq_len": 65}, "max_seq_len must be between 18 and 64"),
    ({"texts": CORPUS}, "name is required"),
])
def test_fit_job_refuses_bad_requests(client, body, message):
    assert message in err(client.post("/jobs/jlens_fit", json=body))


def test_jlens_spec_loading(jmodel, tiny_lens, tmp_path, monkeypatch):
    path = tmp_path / "lens.pt"
    tiny_lens.save(str(path))
    for spec in (str(path), str(tmp_path)):  # a file, or a directory holding lens.pt
        model = fresh(jmodel)
        jlens.attach([model], [spec])
        loaded = model.lenses["lens"]
        assert loaded.source["kind"] == "file" and loaded.lens.source_layers == tiny_lens.source_layers
        assert torch.equal(loaded.lens.jacobians[0], tiny_lens.jacobians[0].half().float())
    assert jlens.load("auto", fresh(jmodel)) is None  # a local model: the registry has nothing for it
    assert jlens.split_spec(f"{jmodel.name}={path}", [jmodel.name, "b"]) == (jmodel.name, str(path))
    assert jlens.split_spec("gpt2-small", ["a", "b"]) == ("a", "gpt2-small")
    with pytest.raises(ModelLoadError, match="no such file"):
        jlens.load("./missing.pt", jmodel)
    with pytest.raises(ModelLoadError, match="registry has no entry"):
        jlens.load("not-a-registered-model", jmodel)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as info:
        jlens.load("gpt2-small", jmodel)
    assert "--jlens takes" in str(info.value)
    hub_gpt2 = dataclasses.replace(fresh(jmodel), source={"kind": "hub", "id": "gpt2"})
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):  # auto found its registry lens
        jlens.load("auto", hub_gpt2)
    other = JacobianLens({0: torch.eye(32)}, n_prompts=1, d_model=32)
    other.save(str(tmp_path / "other.pt"))
    with pytest.raises(ModelLoadError, match="d_model"):
        jlens.load(str(tmp_path / "other.pt"), jmodel)


# --- every family -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_reads_the_library_lens_or_refuses(name, tmp_path):
    build(name, str(tmp_path / "model"))
    model = load_model(str(tmp_path / "model"), device="cpu")
    client = create_app({"TESTING": True, "JLENS_DIR": str(tmp_path / "jlens")}, model=model).test_client()
    if not FAMILIES[name].causal:
        for path, body in (("/lens", {"text": TEXT, "lens": "jacobian"}),
                           ("/predict", {"text": TEXT, "token_index": 1, "lens": "jacobian"}),
                           ("/jobs/jlens_fit", {"texts": CORPUS, "name": "x"})):
            assert "cannot use a Jacobian lens" in err(client.post(path, json=body))
        return
    r = client.post("/jobs/jlens_fit", json={"texts": CORPUS[:2], "name": "fam"})
    assert r.status_code == 202, r.get_json()
    assert wait_job(client, r.get_json()["job"], timeout=300)["status"] == "done"
    lens = model.lenses["fam"].lens
    answer = ok(client.post("/lens", json={"text": GRID_TEXT, "top_k": 3, "lens": "jacobian"}))
    ids = [t["token_id"] for t in ok(client.post("/tokenize", json={"text": GRID_TEXT}))["tokens"]]
    ref = lens.readout(model.bridge, torch.tensor([ids]), top_k=3, return_full_logits=True)
    p = torch.stack([ref.lens_logits[l] for l in range(model.cfg.n_layers)]).double().softmax(-1)
    got = [[[t["probability"] for t in cell] for cell in row] for row in answer["top"]]
    assert np.allclose(got, p.topk(3, -1).values.numpy(), atol=TOL, rtol=0)
    assert np.allclose([[t["probability"] for t in cell] for cell in answer["final"]],
                       ref.model_logits.double().softmax(-1).topk(3, -1).values.numpy(), atol=TOL, rtol=0)
    assert os.path.exists(tmp_path / "jlens" / "fam.pt")


# --- steering along a lens direction -----------------------------------------------------------

def test_jlens_steering_vector_is_the_library_lens_vector(client, jmodel, tiny_lens):
    with_lens(jmodel, tiny_lens)
    body = {"layer": 1, "site": "resid_post", "vector": {"kind": "jlens", "token": " Paris"}, "coefficient": 2.5}
    answer = ok(client.post("/steering_vector", json=body))
    token = jmodel.bridge.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    expected = 2.5 * tiny_lens.lens_vectors(jmodel.bridge, token, 1)[0]
    assert np.allclose(answer["values"], expected.numpy(), atol=1e-6, rtol=0)
    assert "site must be \"resid_post\"" in err(client.post("/steering_vector", json={**body, "site": "resid_pre"}))
    assert "has matrices for layers [0, 1], not 2" in err(client.post("/steering_vector", json={**body, "layer": 2}))
    assert "vector.jlens 'x' is neither loaded nor saved" in err(client.post(
        "/steering_vector", json={**body, "vector": {"kind": "jlens", "token": " Paris", "jlens": "x"}}))


def test_generate_steered_along_a_lens_direction_equals_the_library_steering_hooks(client, jmodel, tiny_lens):
    """The library adds alpha x the median residual norm x the unit lens vector: the same addition
    as unit: true with that coefficient. Compared on the prompt's pass (the first new token)."""
    with_lens(jmodel, tiny_lens)
    bridge, layer, alpha = jmodel.bridge, 1, 4.0
    ids = [t["token_id"] for t in ok(client.post("/tokenize", json={"text": FACT}))["tokens"]]
    tokens = torch.tensor([ids])
    got = {}
    with torch.no_grad():
        bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_out",
                                                  lambda t, hook: got.setdefault("h", t.detach().clone()))])
        median = float(got["h"].float().norm(dim=-1).median())
        hooks = tiny_lens.steering_hooks(bridge, " Paris", [layer], alpha=alpha)
        expected = bridge.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1].double().log_softmax(-1)
    answer = ok(client.post("/generate", json={"prompt": FACT, "max_new_tokens": 1, "alternatives": 5, "steer": [
        {"layer": layer, "site": "resid_post", "vector": {"kind": "jlens", "token": " Paris"}, "unit": True,
         "coefficient": alpha * median}]}))
    step = answer["generated"][0]
    assert step["token_id"] == int(expected.argmax())
    assert abs(step["logprob"] - float(expected.max())) < TOL
    assert np.allclose([a["probability"] for a in step["alternatives"]], expected.exp().topk(5).values.numpy(),
                       atol=TOL, rtol=0)
    plain = ok(client.post("/generate", json={"prompt": FACT, "max_new_tokens": 1}))["generated"][0]
    assert abs(plain["logprob"] - step["logprob"]) > 1e-3  # the steering acted


def test_jlens_flag_loads_with_the_models_or_explains(tiny_dir, tiny_model, tiny_lens, tmp_path, capsys, monkeypatch):
    import argparse

    from explorer.web.server import add_model_arguments, load_configured, model_config, parse_model_arguments

    path = tmp_path / "flag.pt"
    tiny_lens.save(str(path))

    def configured(*argv: str) -> dict:
        p = argparse.ArgumentParser()
        add_model_arguments(p)
        return model_config(parse_model_arguments(p, ["--model", str(tiny_dir), "--device", "cpu", *argv]))

    monkeypatch.setenv("EXPLORER_JLENS", "")
    config = configured("--jlens", f"{tiny_dir}={path}")
    assert config["JLENS"] == [f"{tiny_dir}={path}"]
    models = load_configured(config)
    assert list(models[0].lenses) == ["flag"] and models[0].lenses["flag"].source["path"] == str(path)
    assert load_configured(configured("--jlens", str(tmp_path / "missing.pt"))) is None
    out = capsys.readouterr().err
    assert "Could not load the Jacobian lens" in out and "Traceback" not in out
    monkeypatch.setenv("EXPLORER_JLENS", str(path))
    assert configured()["JLENS"] == [str(path)]


# --- the fit in chunks --------------------------------------------------------------------------

def test_the_fit_in_turns_equals_the_library_fit_while_other_passes_interleave(tiny_model):
    """The job's fit runs one backward pass per chunk; forward passes of other requests between
    chunks see the model unchanged, and the lens is still exactly `JacobianLens.fit`'s."""
    from explorer.runtime.jobs import in_turns

    bridge, d_model = tiny_model.bridge, int(tiny_model.cfg.d_model)
    flags = [p.requires_grad for p in bridge.parameters()]
    ids = torch.tensor([bridge.to_tokens(TEXT)[0].tolist()])
    with torch.inference_mode():
        before = bridge(ids).clone()
    steps = in_turns(lambda pause: jlens.fit(bridge, CORPUS[:2], corpus="tests", source_layers=None,
                                             max_seq_len=64, pause=pause))
    chunks = 0
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            lens = stop.value
            break
        chunks += 1
        with torch.inference_mode():  # another request's pass, between two chunks of the fit
            assert torch.equal(bridge(ids), before)
    assert chunks == 2 * -(-d_model // jlens.DIM_BATCH)  # one pause per backward pass
    direct = fitted(bridge, CORPUS[:2], max_seq_len=64)
    assert lens.source_layers == direct.source_layers and lens.metadata == direct.metadata
    for layer in direct.source_layers:
        assert torch.equal(lens.jacobians[layer], direct.jacobians[layer])
    assert [p.requires_grad for p in bridge.parameters()] == flags  # the library's freeze undone


def test_a_fit_cancelled_inside_a_text_stops_within_a_pass_and_restores_the_model(client, jmodel, tmp_path):
    flags = [p.requires_grad for p in jmodel.bridge.parameters()]
    texts = CORPUS * 20
    job = client.post("/jobs/jlens_fit", json={"texts": texts, "name": "inside"}).get_json()["job"]
    seen: list[float] = []
    deadline = time.monotonic() + 60
    while len(seen) < 20 and time.monotonic() < deadline:
        if (state := ok(client.get(f"/jobs/{job}")))["progress"] > 0:
            seen.append(state["progress"] * len(texts))
        time.sleep(0.003)
    assert state["status"] == "running"
    assert any(abs(done - round(done)) > 1e-3 for done in seen), seen  # progress inside a text, not only between
    busy = client.post("/jobs/jlens_fit", json={"texts": CORPUS, "name": "second"})
    assert busy.status_code == 503 and "already running" in busy.get_json()["error"]
    assert ok(client.delete(f"/jobs/{job}"))["status"] in ("cancelling", "cancelled")
    assert wait_job(client, job, timeout=60)["status"] == "cancelled"
    assert [p.requires_grad for p in jmodel.bridge.parameters()] == flags  # the library's freeze undone
    assert "inside" not in jmodel.lenses and not (tmp_path / "jlens" / "inside.pt").exists()
    r = client.post("/jobs/jlens_fit", json={"texts": CORPUS[:1], "name": "after"})  # the slot is free again
    assert wait_job(client, r.get_json()["job"], timeout=120)["status"] == "done"


def test_model_lists_the_lenses_it_can_load_and_a_saved_one_loads_by_name(client, jmodel, tmp_path, monkeypatch):
    assert ok(client.get("/model"))["lenses_available"] == []
    r = client.post("/jobs/jlens_fit", json={"texts": CORPUS[:2], "name": "kept"})
    assert wait_job(client, r.get_json()["job"], timeout=120)["status"] == "done"
    path = str(tmp_path / "jlens" / "kept.pt")
    listed = ok(client.get("/model"))["lenses_available"]
    assert [(a["kind"], a["spec"], a["name"], a["loaded"], a["n_prompts"]) for a in listed] == \
        [("file", path, "kept", True, 2)]
    # a server started later (same lens directory, the lens not loaded) lists it, and loads it by name
    (tmp_path / "jlens" / "other.pt").write_bytes(b"not a lens")  # skipped, not an error
    later_model = fresh(jmodel)
    later = create_app({"TESTING": True, "JLENS_DIR": str(tmp_path / "jlens")}, model=later_model).test_client()
    assert [(a["name"], a["loaded"]) for a in ok(later.get("/model"))["lenses_available"]] == [("kept", False)]
    answer = grid(later, lens="jacobian", jlens="kept")
    assert answer == grid(client, lens="jacobian", jlens="kept")  # the same lens as the fitting server's
    assert [lens["name"] for lens in ok(later.get("/model"))["lenses"]] == ["kept"]
    assert "neither loaded nor saved" in err(later.post("/lens", json={"text": GRID_TEXT, "lens": "jacobian",
                                                                        "jlens": "other"}))
    monkeypatch.setattr(jmodel.cfg, "model_name", "another-model")  # a lens saved for another model is not listed
    assert jlens.available(jmodel, str(tmp_path / "jlens")) == []


def test_model_lists_the_registry_lens_of_its_hub_id(jmodel, tmp_path):
    hub = dataclasses.replace(jmodel, lenses={}, source={"kind": "hub", "id": "openai-community/gpt2", "commit": None})
    listed = jlens.available(hub, str(tmp_path / "none"))
    from huggingface_hub import try_to_load_from_cache

    repo, filename, revision = jlens._registry("gpt2-small")
    cached = isinstance(try_to_load_from_cache(repo, filename, revision=revision), str)  # False here: no network
    assert listed == [{"kind": "hub", "spec": "openai-community/gpt2", "name": "gpt2_jacobian_lens", "repo": repo,
                       "filename": filename, "revision": revision, "cached": cached, "loaded": False}]
    assert jlens.available(dataclasses.replace(hub, source={"kind": "hub", "id": "no/such-model"}), str(tmp_path)) == []
