"""SAE features (/features, /feature, GET /saes, --sae): random SAEs written in the SAELens
directory format and as Gemma Scope's params.npz, every architecture; activations against an
independent plain-torch encoder on plain HF activations, edits against HF forward hooks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from app import create_app
from explorer.math import sae as sae_math
from explorer.runtime.loading import ModelLoadError
from explorer.runtime.saes import for_model, gemma_scope_hook, load_sae, parse_spec, write_random_sae
from tests.helpers import (CLEAN, TEXT, block_outputs, err, ids_of, ok, reference_decode, reference_encode,
                           reference_params, wait_job)

SCALE = 0.3  # about the tiny GPT-2's activation norms: a good share of the random features fire
D_SAE = 96
# name -> (hook, writer options)
SAES = {
    "standard": ("blocks.1.hook_resid_pre", {"architecture": "standard"}),
    "standard-nob": ("blocks.1.hook_resid_pre", {"architecture": "standard", "apply_b_dec_to_input": False}),
    "topk": ("blocks.2.hook_resid_pre", {"architecture": "topk", "k": 5}),
    "jumprelu": ("blocks.1.hook_resid_post", {"architecture": "jumprelu"}),
    "gated": ("blocks.0.hook_mlp_out", {"architecture": "gated"}),
    "rescaled": ("blocks.1.hook_attn_out", {"architecture": "standard", "normalize_activations": "constant_norm_rescale"}),
    "layernorm": ("blocks.2.hook_resid_pre", {"architecture": "standard", "normalize_activations": "layer_norm"}),
    "z": ("blocks.1.attn.hook_z", {"architecture": "standard"}),
    "z-head": ("blocks.2.attn.hook_z", {"architecture": "jumprelu", "head": 3}),
}
WIDTH = {"z-head": 16}  # d_head of the tiny GPT-2 (64 / 4 heads); every other hook is 64 wide


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("saes")
    paths = {name: str(write_random_sae(root / name, d_in=WIDTH.get(name, 64), d_sae=D_SAE, hook=hook, seed=i,
                                        scale=SCALE, **opts))
             for i, (name, (hook, opts)) in enumerate(SAES.items())}
    paths["gemma"] = str(write_random_sae(root / "gemma", d_in=64, d_sae=D_SAE, hook="", fmt="gemma-scope", seed=50,
                                          scale=SCALE))
    return paths


def spec(name: str, path: str) -> str:
    return f"name={name},hook=blocks.1.hook_resid_post,{path}" if name == "gemma" else f"name={name},{path}"


@pytest.fixture(scope="module")
def sae_app(tiny_model, sae_dirs):
    app = create_app({"TESTING": True, "SAES": [spec(n, p) for n, p in sae_dirs.items()]}, model=tiny_model)
    yield app
    app.extensions["explorer"].worker.wait_idle(60)


@pytest.fixture()
def sc(sae_app):
    return sae_app.test_client()


# --- the independent reference: plain torch on the files, plain HF activations ------------------

def hf_activation(hf_patcher, ids: list[int], hook: str, head: int | None = None) -> torch.Tensor:
    """The hook's activation [seq, d_in] from plain HF hooks (resid_post L = resid_pre L+1)."""
    layer, site = int(hook.split(".")[1]), hook.split(".", 2)[2]
    got = hf_patcher.capture(ids)
    n_layers = len(got["resid_pre"])
    if site == "hook_resid_post":
        if layer + 1 < n_layers:
            return got["resid_pre"][layer + 1]
        raise AssertionError("not used")
    x = {"hook_resid_pre": got["resid_pre"], "hook_mlp_out": got["mlp_out"], "hook_attn_out": got["attn_out"],
         "attn.hook_z": got["z"]}[site][layer]
    if head is not None:
        d_head = hf_patcher.d_head
        x = x[:, head * d_head:(head + 1) * d_head]
    return x


def reference(sae_dirs, hf_patcher, name: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg, params = reference_params(sae_dirs[name])
    hook = "blocks.1.hook_resid_post" if name == "gemma" else cfg["metadata"]["hook_name"]
    x = hf_activation(hf_patcher, ids, hook, (cfg.get("metadata") or {}).get("hook_head_index"))
    f, recon = reference_encode(cfg, params, x)
    return x.double(), f, recon


# --- activations and quality ------------------------------------------------------------------

@pytest.mark.parametrize("name", [*SAES, "gemma"])
def test_activations_equal_a_plain_torch_encoder_on_hf_activations(sc, sae_dirs, hf_patcher, name):
    ids = ids_of(sc, CLEAN)
    x, f, recon = reference(sae_dirs, hf_patcher, name, ids)
    assert (f > 0).any(), "the random SAE must fire somewhere, or the comparison shows nothing"
    got = ok(sc.post("/features", json={"text": CLEAN, "sae": name, "top_k": 100}))
    dense = torch.zeros_like(f)
    for p, tok in enumerate(got["tokens"]):
        assert tok["token_id"] == ids[p]
        assert tok["l0"] == int((f[p] > 0).sum())
        values = [a["activation"] for a in tok["features"]]
        assert values == sorted(values, reverse=True)
        for a in tok["features"]:
            dense[p, a["index"]] = a["activation"]
    assert torch.allclose(dense, f, atol=1e-5, rtol=0)
    # Quality, from its definitions on the reference reconstruction.
    err2 = ((x - recon) ** 2).sum(1)
    rel = err2 / (x ** 2).sum(1)
    fve = 1 - err2 / ((x - x.mean(1, keepdim=True)) ** 2).sum(1)
    assert np.allclose([t["relative_mse"] for t in got["tokens"]], rel.numpy(), atol=1e-5, rtol=1e-4)
    assert np.allclose([t["variance_explained"] for t in got["tokens"]], fve.numpy(), atol=1e-5, rtol=1e-4)
    text = got["reconstruction"]
    assert text["relative_mse"] == pytest.approx(float(err2.sum() / (x ** 2).sum()), rel=1e-4, abs=1e-6)
    assert text["variance_explained"] == pytest.approx(float(1 - err2.sum() / ((x - x.mean(0)) ** 2).sum()),
                                                       rel=1e-4, abs=1e-6)
    assert text["l0"] == pytest.approx(float((f > 0).sum(1).double().mean()))
    # /feature reads the same activations.
    index = int(f.sum(0).argmax())
    one = ok(sc.post("/feature", json={"text": CLEAN, "sae": name, "index": index}))
    assert np.allclose(one["activations"], f[:, index].numpy(), atol=1e-5, rtol=0)
    assert one["max_activation"] == max(one["activations"])


def test_jumprelu_thresholds_and_topk_ties_are_exercised(sae_dirs, hf_patcher, sc):
    """The comparisons above mean something: some JumpReLU pre-activations are positive but under
    their threshold (so zeroed), and a TopK SAE with two identical features keeps exactly k."""
    ids = ids_of(sc, CLEAN)
    cfg, p = reference_params(sae_dirs["jumprelu"])
    x = hf_activation(hf_patcher, ids, "blocks.1.hook_resid_post").double()
    pre = (x - p["b_dec"].double()) @ p["W_enc"].double() + p["b_enc"].double()
    assert ((pre > 0) & (pre <= p["threshold"].double())).any()


def test_topk_with_tied_features_keeps_k(tmp_path, tiny_model, hf_patcher):
    path = write_random_sae(tmp_path / "tied", d_in=64, d_sae=32, hook="blocks.1.hook_resid_pre", architecture="topk",
                            k=4, scale=SCALE)
    weights = load_file(f"{path}/sae_weights.safetensors")
    weights["W_enc"][:, 1] = weights["W_enc"][:, 0]  # features 0 and 1 tie everywhere
    weights["b_enc"][1] = weights["b_enc"][0] = 10.0  # and are always in the top k
    from safetensors.torch import save_file
    save_file(weights, f"{path}/sae_weights.safetensors")
    client = create_app({"TESTING": True, "SAES": [str(path)]}, model=tiny_model).test_client()
    got = ok(client.post("/features", json={"text": TEXT, "sae": "blocks.1.hook_resid_pre", "top_k": 10}))
    cfg, params = reference_params(str(path))
    f, _ = reference_encode(cfg, params, hf_activation(hf_patcher, ids_of(client, TEXT), "blocks.1.hook_resid_pre"))
    for p, tok in enumerate(got["tokens"]):
        assert tok["l0"] == 4
        assert {a["index"] for a in tok["features"]} >= {0, 1}
        dense = torch.zeros(32, dtype=torch.float64)
        for a in tok["features"]:
            dense[a["index"]] = a["activation"]
        assert torch.allclose(dense, f[p], atol=1e-5, rtol=0)


def test_features_are_cached_per_text_and_sae(sc, sae_app):
    ex = sae_app.extensions["explorer"]
    first = ok(sc.post("/features", json={"text": "A new text for the cache", "sae": "standard"}))
    computations = ex.cache.computations
    assert ok(sc.post("/features", json={"text": "A new text for the cache", "sae": "standard", "top_k": 3}))
    assert ex.cache.computations == computations
    again = ok(sc.post("/features", json={"text": "A new text for the cache", "sae": "standard"}))
    assert again == first


def test_token_ids_answer_as_the_text(sc):
    ids = ids_of(sc, TEXT)
    assert (ok(sc.post("/features", json={"token_ids": ids, "sae": "topk"}))
            == ok(sc.post("/features", json={"text": TEXT, "sae": "topk"})))


# --- the decoder direction and direct attribution ---------------------------------------------

def test_promoted_tokens_and_direct_attribution(sc, sae_dirs, hf_model):
    cfg, p = reference_params(sae_dirs["standard"])
    ids = ids_of(sc, CLEAN)
    got = ok(sc.post("/feature", json={"text": CLEAN, "sae": "standard", "index": 7, "top_k": 5,
                                       "answer": " Mary", "distractor": " John"}))
    logits = p["W_dec"][7].double() @ hf_model.lm_head.weight.double().T
    assert [t["token_id"] for t in got["promotes"]] == logits.topk(5).indices.tolist()
    assert [t["token_id"] for t in got["suppresses"]] == (-logits).topk(5).indices.tolist()
    # DLA: activation x the direction through ln_f with the last position's scale frozen (the
    # last block's output: HF's last hidden state already has ln_f).
    ln = hf_model.transformer.ln_f
    with block_outputs(hf_model.transformer.h) as outs, torch.inference_mode():
        hf_model(torch.tensor([ids]))
    resid = outs[-1][0, -1].double()
    sd = (resid - resid.mean()).pow(2).mean().add(ln.eps).sqrt()
    d = p["W_dec"][7].double()
    read = (d - d.mean()) / sd * ln.weight.detach().double()
    mary, john = ids_of(sc, " Mary")[-1], ids_of(sc, " John")[-1]
    unembed = hf_model.lm_head.weight.detach().double()
    expected = got["activations"][-1] * float(read @ (unembed[mary] - unembed[john]))
    assert got["attribution"]["position"] == len(ids) - 1
    assert got["attribution"]["value"] == pytest.approx(expected, abs=2e-6)


def test_hook_z_features_have_no_residual_direction(sc):
    got = ok(sc.post("/feature", json={"text": TEXT, "sae": "z", "index": 0, "answer": " mat"}))
    assert got["promotes"] is None and got["suppresses"] is None and got["attribution"] is None


# --- edits ------------------------------------------------------------------------------------

def hf_edited_metric(hf_patcher, sae_dirs, name: str, ids: list[int], index: int, value: float,
                     positions: list[int] | None, metric) -> float:
    """The metric with feature `index` set to `value` at `positions`, edited in a plain HF hook:
    x + decode(f') - decode(f), from the reference encoder."""
    cfg, params = reference_params(sae_dirs[name])
    hook = cfg["metadata"]["hook_name"]
    layer, site = int(hook.split(".")[1]), hook.split(".", 2)[2]
    head = cfg["metadata"].get("hook_head_index")
    x = hf_activation(hf_patcher, ids, hook, head)
    f, recon = reference_encode(cfg, params, x)
    g = f.clone()
    g[positions if positions is not None else slice(None), index] = value
    delta = (reference_decode(cfg, params, g, x) - recon).float()
    where = {"hook_resid_pre": "resid_pre", "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out", "attn.hook_z": "z"}[site]

    def replace(t: torch.Tensor) -> torch.Tensor:
        if head is None:
            t[0] += delta
        else:
            d = hf_patcher.d_head
            t[0, :, head * d:(head + 1) * d] += delta
        return t
    return hf_patcher.metric_with(ids, where, layer, replace, metric)


def logit_diff(answer: int, distractor: int):
    return lambda logits: logits[answer] - logits[distractor]


@pytest.mark.parametrize("name", ["standard", "gated", "rescaled", "z", "z-head"])
def test_ablating_each_feature_equals_an_hf_hook_doing_the_same_edit(sc, sae_dirs, hf_patcher, name):
    ids = ids_of(sc, CLEAN)
    _, f, _ = reference(sae_dirs, hf_patcher, name, ids)
    active = [int(i) for i in f.sum(0).argsort(descending=True)[:4]]
    mary, john = ids_of(sc, " Mary")[-1], ids_of(sc, " John")[-1]
    got = ok(sc.post("/feature", json={"text": CLEAN, "sae": name, "index": active[0], "answer": " Mary",
                                       "distractor": " John", "edit": "ablate", "indices": active}))
    edit = got["edit"]
    assert edit["metric"] == "logit_diff" and edit["positions"] == list(range(len(ids)))
    for result, index in zip(edit["results"], active):
        expected = hf_edited_metric(hf_patcher, sae_dirs, name, ids, index, 0.0, None, logit_diff(mary, john))
        assert result["index"] == index
        assert result["metric"] == pytest.approx(expected, abs=1e-5)
        assert result["effect"] == pytest.approx(result["metric"] - edit["clean_metric"], abs=1e-6)
    assert any(abs(r["effect"]) > 1e-4 for r in edit["results"]), "no edit changed the metric: the test shows nothing"


def test_clamping_at_some_positions_equals_an_hf_hook(sc, sae_dirs, hf_patcher):
    ids = ids_of(sc, CLEAN)
    mary = ids_of(sc, " Mary")[-1]
    got = ok(sc.post("/feature", json={"text": CLEAN, "sae": "topk", "index": 3, "answer": " Mary", "edit": "clamp",
                                       "value": 2.5, "positions": [2, 5]}))
    expected = hf_edited_metric(hf_patcher, sae_dirs, "topk", ids, 3, 2.5, [2, 5],
                                lambda logits: logits.log_softmax(-1)[mary])
    assert got["edit"]["metric"] == "logprob" and got["edit"]["value"] == 2.5
    assert got["edit"]["results"][0]["metric"] == pytest.approx(expected, abs=1e-5)
    assert abs(got["edit"]["results"][0]["effect"]) > 1e-4


def test_an_edit_that_changes_nothing_changes_no_output(sc, sae_app, sae_dirs, hf_patcher):
    """Reconstruction + error = the hook's activation exactly: ablating an inactive feature, or
    clamping one to its own value, leaves the activation bit for bit and the metric unchanged."""
    ids = ids_of(sc, CLEAN)
    _, f, _ = reference(sae_dirs, hf_patcher, "standard", ids)
    inactive = int((f.sum(0) == 0).nonzero()[0])
    got = ok(sc.post("/feature", json={"text": CLEAN, "sae": "standard", "index": inactive, "answer": " Mary",
                                       "edit": "ablate"}))
    assert got["edit"]["results"][0]["effect"] == 0.0
    ex = sae_app.extensions["explorer"]
    sae = ex.sae("standard")
    acts = ex.acts(CLEAN)
    x = sae_math.from_acts(acts, sae)
    feats = sae_math.encode(sae, sae_math.flat(sae, x))
    active = int(feats.sum(0).argmax())
    same = sae_math.edited(sae, x, feats, [active, inactive], torch.tensor([feats[2, active], 0.0]), [2])
    assert torch.equal(same[0], x) and torch.equal(same[1], x)


def test_edits_run_as_a_job(sc):
    job = sc.post("/feature", json={"text": CLEAN, "sae": "jumprelu", "index": 1, "answer": " Mary", "edit": "ablate",
                                    "indices": list(range(12)), "async": True})
    assert job.status_code == 202
    state = wait_job(sc, job.get_json()["job"])
    assert state["status"] == "done"
    sync = ok(sc.post("/feature", json={"text": CLEAN, "sae": "jumprelu", "index": 1, "answer": " Mary",
                                        "edit": "ablate", "indices": list(range(12))}))
    assert state["result"]["edit"] == sync["edit"]


# --- errors and listing -----------------------------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    ({"sae": "nope"}, "sae 'nope' is not loaded"),
    ({"index": D_SAE}, f"index must be between 0 and {D_SAE - 1}"),
    ({"edit": "ablate"}, "edit needs answer"),
    ({"answer": " Mary", "edit": "ablate", "value": 1.0}, "value applies to edit 'clamp' only"),
    ({"answer": " Mary", "edit": "clamp"}, "edit 'clamp' needs value"),
    ({"answer": " Mary", "edit": "clamp", "value": 1e9}, "|value| <= 1e+06"),
    ({"answer": " Mary", "edit": "ablate", "positions": [99]}, "positions[] must be between 0 and"),
    ({"answer": " Mary", "edit": "ablate", "indices": [1, 1]}, "indices must not contain duplicates"),
    ({"answer": " Mary", "edit": "ablate", "indices": []}, "indices must hold between 1 and 256"),
    ({"answer": " Mary", "edit": "ablate", "indices": [D_SAE]}, "indices[] must be between 0 and"),
    ({"distractor": " John"}, "distractor needs an answer"),
    ({"positions": [1]}, "positions applies only with edit"),
    ({"position": 99}, "position must be between 0 and"),
    ({"edit": "erase"}, "edit must be one of 'ablate', 'clamp'"),
])
def test_feature_errors_name_the_field(sc, body, fragment):
    assert fragment in err(sc.post("/feature", json={"text": CLEAN, "sae": "standard", "index": 1, **body}))


def test_features_errors(sc):
    assert "top_k must be between 1 and 100" in err(sc.post("/features", json={"text": TEXT, "sae": "topk", "top_k": 0}))
    assert "sae is required" in err(sc.post("/features", json={"text": TEXT}))
    assert "give either text or token_ids" in err(sc.post("/features", json={"sae": "topk"}))


def test_saes_are_listed(sc, sae_dirs):
    listed = ok(sc.get("/saes"))["saes"]
    assert [s["name"] for s in listed] == [*SAES, "gemma"]
    first = listed[0]
    assert first["hook"] == "blocks.1.hook_resid_pre" and first["layer"] == 1 and first["d_sae"] == D_SAE
    assert first["architecture"] == "standard" and first["source"]["kind"] == "local"
    assert first["source"]["path"] == sae_dirs["standard"] and len(first["source"]["sha256"]) == 64
    assert listed[-1]["source"]["format"] == "gemma-scope" and listed[-1]["hook"] == "blocks.1.hook_resid_post"
    assert next(s for s in listed if s["name"] == "topk")["k"] == 5
    assert next(s for s in listed if s["name"] == "z-head")["head"] == 3
    assert ok(sc.get("/model"))["saes"] == listed


# --- loading ----------------------------------------------------------------------------------

def test_each_model_gets_its_saes():
    specs = ["name=a,/x", "model=m2,name=b,/y", "model=m1,/z"]
    assert for_model(specs, "m1", default=True) == ["name=a,/x", "model=m1,/z"]
    assert for_model(specs, "m2", default=False) == ["model=m2,name=b,/y"]


def test_spec_options():
    assert parse_spec("name=a,model=m,hook=blocks.1.hook_resid_pre,/x/y") == parse_spec(
        "hook=blocks.1.hook_resid_pre,name=a,model=m,/x/y")
    s = parse_spec("name=res8,jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre")
    assert (s.name, s.model, s.location) == ("res8", None, "jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre")
    with pytest.raises(ModelLoadError, match="given twice"):
        parse_spec("name=a,name=b,/x")
    assert gemma_scope_hook("google/gemma-scope-2b-pt-res:layer_20/width_16k/average_l0_71") == "blocks.20.hook_resid_post"
    assert gemma_scope_hook("google/gemma-scope-9b-pt-mlp:layer_3/width_16k/x") == "blocks.3.hook_mlp_out"
    assert gemma_scope_hook("google/gemma-scope-2b-pt-att:layer_1/width_16k/x") == "blocks.1.attn.hook_z"
    assert gemma_scope_hook("/some/dir/params.npz") is None


def rewrite(path, **changes) -> None:
    cfg = json.load(open(f"{path}/cfg.json"))
    cfg.update(changes)
    json.dump(cfg, open(f"{path}/cfg.json", "w"))


@pytest.mark.parametrize("change, fragment", [
    ({"architecture": "batchtopk"}, "architecture 'batchtopk' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "needs a scaling factor"),
    ({"metadata": {}}, "hook_name must be a hook"),
    ({"d_in": 65}, "d_in is 65 in the config but 64 in W_enc"),
    ({"architecture": "topk", "k": 0}, "k (the topk architecture's active features)"),
    ({"architecture": "jumprelu"}, "needs the tensors threshold"),
])
def test_bad_files_are_refused_naming_the_field(tmp_path, change, fragment):
    path = write_random_sae(tmp_path / "bad", d_in=64, d_sae=8, hook="blocks.0.hook_resid_pre", scale=SCALE)
    rewrite(path, **change)
    with pytest.raises(ModelLoadError, match="Could not load the SAE") as info:
        load_sae(str(path))
    assert fragment in str(info.value)


def test_an_sae_that_does_not_fit_its_model_is_refused_at_start(tmp_path, tiny_model):
    wide = write_random_sae(tmp_path / "wide", d_in=128, d_sae=8, hook="blocks.0.hook_resid_pre")
    with pytest.raises(ModelLoadError, match="has d_in 128, but blocks.0.hook_resid_pre .* is 64 wide"):
        create_app({"SAES": [str(wide)]}, model=tiny_model)
    deep = write_random_sae(tmp_path / "deep", d_in=64, d_sae=8, hook="blocks.7.hook_resid_pre")
    with pytest.raises(ModelLoadError, match="does not have"):
        create_app({"SAES": [str(deep)]}, model=tiny_model)
    with pytest.raises(ModelLoadError, match="names model=other"):
        create_app({"SAES": [f"model=other,{deep}"]}, model=tiny_model)
    with pytest.raises(ModelLoadError, match="neither an existing file or directory nor a Hugging Face reference"):
        create_app({"SAES": [str(tmp_path / "missing")]}, model=tiny_model)


def test_a_hub_reference_offline_and_not_cached_is_one_paragraph(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as info:
        load_sae("jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "\n" not in message


def test_a_hub_reference_in_the_cache_loads_offline(monkeypatch, tmp_path):
    """A repo snapshot laid out as the HF cache keeps it loads without the network, with its commit."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_random_sae(repo / "snapshots" / commit / "blocks.1.hook_resid_pre", d_in=64, d_sae=8,
                     hook="blocks.1.hook_resid_pre")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    sae = load_sae("someone/saes:blocks.1.hook_resid_pre")
    assert sae.source == {"kind": "hub", "id": "someone/saes", "path": "blocks.1.hook_resid_pre", "revision": commit,
                          "format": "saelens"}


# --- steering by a feature --------------------------------------------------------------------

def test_steering_by_a_feature_equals_its_decoder_row_as_values(sc, sae_dirs):
    _, p = reference_params(sae_dirs["standard"])
    row = p["W_dec"][4]
    by_feature = ok(sc.post("/generate", json={"prompt": TEXT, "max_new_tokens": 4, "steer": [
        {"vector": {"kind": "feature", "sae": "standard", "index": 4}, "coefficient": 8.0}]}))
    by_values = ok(sc.post("/generate", json={"prompt": TEXT, "max_new_tokens": 4, "steer": [
        {"layer": 1, "site": "resid_pre", "vector": {"kind": "values", "values": row.tolist()}, "coefficient": 8.0}]}))
    assert by_feature["steering"][0]["layer"] == 1 and by_feature["steering"][0]["site"] == "resid_pre"
    assert by_feature["steering"][0]["kind"] == "feature"
    assert by_feature["token_ids"] == by_values["token_ids"]
    assert [s["logprob"] for s in by_feature["generated"]] == [s["logprob"] for s in by_values["generated"]]
    vec = ok(sc.post("/steering_vector", json={"vector": {"kind": "feature", "sae": "gated", "index": 2}}))
    assert (vec["layer"], vec["site"]) == (0, "resid_post")  # an MLP-output SAE: after the output is added
    assert np.allclose(vec["values"], reference_params(sae_dirs["gated"])[1]["W_dec"][2].numpy(), atol=1e-7)


def test_steering_refusals(sc):
    assert "steer[0].vector: SAE 'z' reads blocks.1.attn.hook_z" in err(sc.post("/generate", json={
        "prompt": TEXT, "steer": [{"vector": {"kind": "feature", "sae": "z", "index": 0}}]}))
    assert "steer[0].vector.sae 'nope' is not loaded" in err(sc.post("/generate", json={
        "prompt": TEXT, "steer": [{"vector": {"kind": "feature", "sae": "nope", "index": 0}}]}))
    assert "steer[0].vector.index must be between 0 and" in err(sc.post("/generate", json={
        "prompt": TEXT, "steer": [{"vector": {"kind": "feature", "sae": "topk", "index": -1}}]}))
    assert "steer[0].layer is required" in err(sc.post("/generate", json={
        "prompt": TEXT, "steer": [{"vector": {"kind": "values", "values": [0.0] * 64}}]}))
