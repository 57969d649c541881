"""Helpers shared by the test modules: the prompts, request shortcuts, job polling, comparison of
two JSON answers, and the independent reference computations on plain HF `transformers` (forward
hooks written here, none of the project's code). Fixtures live in tests/conftest.py; the tiny
models of every family in tests/families.py."""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from tests.families import hf_layers, hf_o_proj

# --- prompts ----------------------------------------------------------------------------------

TINY = {"n_layer": 3, "n_head": 4, "n_embd": 64, "n_positions": 64}  # the tiny GPT-2 of conftest
TEXT = "The cat sat on the mat"
# The indirect-object pair: equal token counts, differing only in the repeated name.
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
TARGET = {"answer": " Mary", "distractor": " John"}
PAIR = {"clean": CLEAN, "corrupt": CORRUPT, **TARGET}
FACT = "The Eiffel Tower is in the city of"  # causal tracing's prompt; its subject is "Eiffel Tower"
# A Jacobian lens's fitting corpus: texts longer than the 17 positions the library skips.
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat watches from the warm window sill at noon.",
    "In the beginning the universe was created, which made a lot of people very angry and was widely regarded.",
    "She sells sea shells by the sea shore, and the shells she sells are surely shells from the sea shore.",
]

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
    *[("/patch", {**PAIR, "site": site})
      for site in ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position")],
    *[("/causal_trace", {"text": FACT, "subject": "Eiffel Tower", "kind": kind, "samples": 3})
      for kind in ("resid", "mlp", "attn")],
    ("/ablate", {"text": CLEAN, **TARGET}),
    ("/ablate", {"text": CLEAN, **TARGET, "method": "zero", "site": "mlp"}),
    ("/attribution_patch", {**PAIR, "site": "heads", "compare": True}),
    ("/attribution_patch", {"clean": CLEAN, "corrupt": CORRUPT, "answer": " Mary", "site": "resid_pre"}),
    ("/generate", {"prompt": TEXT, "max_new_tokens": 4}),
    ("/jobs/chg", {"texts": [CLEAN, "When Tom and Anna went to the park, Anna gave a ball to"],
                   "targets": [" Mary", " Tom"], "steps": 3}),
]


# --- requests and jobs ------------------------------------------------------------------------

def ok(resp) -> dict:
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def err(resp, status: int = 400) -> str:
    assert resp.status_code == status, resp.data
    body = resp.get_json()
    assert set(body) == {"error"}
    return body["error"]


def ids_of(client, text: str) -> list[int]:
    return [t["token_id"] for t in ok(client.post("/tokenize", json={"text": text}))["tokens"]]


def wait_job(client, job: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = ok(client.get(f"/jobs/{job}"))
        if state["status"] in ("done", "error", "cancelled"):
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job} did not end: {state}")


def answer(client, path: str, body: dict, timeout: float = 120) -> dict:
    """The 200 answer of a POST, or for a job-only endpoint (202) its finished result."""
    r = client.post(path, json=body)
    assert r.status_code in (200, 202), (path, r.data[:300])
    if r.status_code == 200:
        return r.get_json()
    state = wait_job(client, r.get_json()["job"], timeout)
    assert state["status"] == "done", state
    return unstamped(state["result"])


def unstamped(result: dict) -> dict:
    """A job's result without the provenance every job result carries (its time differs between
    runs): the part a synchronous answer to the same request holds."""
    assert result["provenance"]["endpoint"] and result["provenance"]["time"], result.get("provenance")
    return {k: v for k, v in result.items() if k != "provenance"}


def assert_same_answer(got, want) -> None:
    """Two answers to one question agree as the API documents (replay's comparison): keys, strings,
    integers and lengths exactly, numbers within 1e-5 of their field's scale. Not bitwise: on some
    CPUs (an AMD EPYC VM here) MKL's float32 matmul rounds a row differently with the number of
    rows, so passes that batch or cache a text differently differ in the last bits."""
    from explorer.experiments.replay import compare

    diff = compare(want, got)
    assert not diff.mismatches, diff.mismatches[:5]


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


def grid_shape(site: str, cfg, seq: int) -> tuple[int, ...]:
    """The shape of a patching grid of `site` for a model config and a prompt length."""
    return {"heads": (cfg.n_layers, cfg.n_heads), "heads_by_position": (cfg.n_layers, cfg.n_heads, seq)}.get(
        site, (cfg.n_layers, seq))


@contextmanager
def running(server) -> Iterator[Any]:
    """A werkzeug server serving from a thread while the block runs, then shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def waitress_serving(app, **options: Any) -> Iterator[Any]:
    """`app` served by waitress (the production server) on a free loopback port from a thread
    while the block runs. It is closed from inside its own loop: closed from another thread, its
    socket can vanish under the loop's select (EBADF in the server thread)."""
    from waitress.server import create_server

    server = create_server(app, host="127.0.0.1", port=0, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.trigger.pull_trigger(server.close)
        thread.join(5)


# --- plain HF references ----------------------------------------------------------------------

@contextmanager
def block_outputs(blocks) -> Iterator[list[torch.Tensor]]:
    """The output hidden state of each of `blocks`, appended in order by every forward pass run
    inside the block (HF's last hidden state is after the final norm, so block outputs are hooked)."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for b in blocks]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hf_reference(hf_model, ids: list[int]) -> dict[str, torch.Tensor]:
    """Plain HF forward on `ids`: block outputs, attentions, output probabilities, and the logit
    lens computed the textbook way, lm_head(ln_f(block output)) for every layer."""
    with block_outputs(hf_model.transformer.h) as outputs, torch.inference_mode():
        out = hf_model(torch.tensor([ids]), output_attentions=True)
        hidden = torch.stack(outputs)[:, 0]  # [n_layers, seq, d_model] (HF's last hidden state has ln_f)
        lens = hf_model.lm_head(hf_model.transformer.ln_f(hidden)).softmax(-1)
    return {
        "attentions": torch.stack(out.attentions)[:, 0],  # [n_layers, n_heads, seq, seq]
        "probs": out.logits[0].softmax(-1),  # [seq, d_vocab]
        "hidden": hidden,
        "lens": lens,  # [n_layers, seq, d_vocab]
    }


@contextmanager
def hf_adding(hf_model, layer: int, site: str, rows: torch.Tensor, positions: list[int]):
    """HF with `rows[i]` added at `positions[i]` of block `layer`'s input (resid_pre) or output (resid_post)."""
    block = hf_layers(hf_model)[layer]

    def add(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        for row, p in zip(rows, positions):
            if p < hidden.shape[1]:
                hidden[0, p] += row
        return hidden
    if site == "resid_pre":
        handle = block.register_forward_pre_hook(lambda m, args: (add(args[0]),) + args[1:])
    else:
        handle = block.register_forward_hook(
            lambda m, args, out: (add(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else add(out))
    try:
        yield
    finally:
        handle.remove()



class HFPatcher:
    """Activation patching on a plain HF model, one forward per cell. Sites resid_pre and z (the
    attention output projection's input) on every family (tests/families.py); attn_out and
    mlp_out on GPT-2."""

    def __init__(self, hf_model) -> None:
        self.model = hf_model
        self.blocks = hf_layers(hf_model)
        self.n_heads = hf_model.config.num_attention_heads
        self.d_head = hf_o_proj(self.blocks[0]).weight.numel() // hf_model.config.hidden_size // self.n_heads

    def _modules(self, site: str, layer: int):
        block = self.blocks[layer]
        if site == "resid_pre":
            return block
        if site == "z":
            return hf_o_proj(block)
        return {"attn_out": block.attn, "mlp_out": block.mlp}[site]

    def capture(self, ids: list[int], sites: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out", "z")
                ) -> dict[str, list[torch.Tensor]]:
        """Each site's activation of every layer: resid_pre/z are inputs, attn_out/mlp_out outputs."""
        got: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        handles = []
        for layer in range(len(self.blocks)):
            for site in {"resid_pre", "z"} & set(sites):
                handles.append(self._modules(site, layer).register_forward_pre_hook(
                    lambda m, args, site=site: got[site].append(args[0][0].clone())))
            for site in {"attn_out", "mlp_out"} & set(sites):
                handles.append(self._modules(site, layer).register_forward_hook(
                    lambda m, args, out, site=site: got[site].append((out[0] if isinstance(out, tuple) else out)[0].clone())))
        try:
            with torch.inference_mode():
                self.model(torch.tensor([ids]))
        finally:
            for h in handles:
                h.remove()
        return got

    def metric_with(self, ids: list[int], site: str, layer: int, replace, metric) -> float:
        """The metric of `ids` with `replace(tensor)` applied in place to one site's activation."""
        module = self._modules(site, layer)
        if site in ("resid_pre", "z"):
            handle = module.register_forward_pre_hook(lambda m, args: (replace(args[0].clone()),) + args[1:])
        else:
            def hook(m, args, out):
                first = replace((out[0] if isinstance(out, tuple) else out).clone())
                return (first,) + out[1:] if isinstance(out, tuple) else first
            handle = module.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                logits = self.model(torch.tensor([ids])).logits[0, -1]
        finally:
            handle.remove()
        return float(metric(logits))

    def grid(self, site: str, base_ids: list[int], source: dict, metric) -> np.ndarray:
        n_layers, seq, n_heads, d_head = len(self.blocks), len(base_ids), self.n_heads, self.d_head

        def set_pos(t, src, p):
            t[0, p] = src[p]
            return t

        def set_head(t, src, h, p=None):
            sl = slice(h * d_head, (h + 1) * d_head)
            if p is None:
                t[0, :, sl] = src[:, sl]
            else:
                t[0, p, sl] = src[p, sl]
            return t

        if site in ("resid_pre", "attn_out", "mlp_out"):
            return np.array([[self.metric_with(base_ids, site, l, lambda t, l=l, p=p: set_pos(t, source[site][l], p), metric)
                              for p in range(seq)] for l in range(n_layers)])
        if site == "heads":
            return np.array([[self.metric_with(base_ids, "z", l, lambda t, l=l, h=h: set_head(t, source["z"][l], h), metric)
                              for h in range(n_heads)] for l in range(n_layers)])
        return np.array([[[self.metric_with(base_ids, "z", l, lambda t, l=l, h=h, p=p: set_head(t, source["z"][l], h, p), metric)
                           for p in range(seq)] for h in range(n_heads)] for l in range(n_layers)])


# --- SAEs, written from the architectures' definitions (the project's encoders are not used) ---

def reference_params(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    if path.endswith(".npz"):
        with np.load(path) as npz:
            return ({"architecture": "jumprelu", "apply_b_dec_to_input": False, "normalize_activations": "none"},
                    {k: torch.tensor(npz[k]) for k in npz.files})
    return json.load(open(f"{path}/cfg.json")), load_file(f"{path}/sae_weights.safetensors")


def reference_encode(cfg: dict, p: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) of x [seq, d_in], written from the architectures' definitions."""
    x = x.double()
    p = {k: v.double() for k, v in p.items()}
    norm = cfg.get("normalize_activations", "none")
    if norm == "constant_norm_rescale":
        c = x.shape[1] ** 0.5 / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        xn, back = x * c, (lambda y: y / c)
    elif norm == "layer_norm":
        mu, sd = x.mean(1, keepdim=True), (x - x.mean(1, keepdim=True)).std(1, keepdim=True)
        xn, back = (x - mu) / (sd + 1e-5), (lambda y: y * sd + mu)
    else:
        xn, back = x, (lambda y: y)
    if cfg.get("apply_b_dec_to_input", True):
        xn = xn - p["b_dec"]
    arch = cfg["architecture"]
    if arch == "gated":
        f = torch.where(xn @ p["W_enc"] + p["b_gate"] > 0, torch.clamp(xn @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"], min=0), 0.0)
    else:
        pre = xn @ p["W_enc"] + p["b_enc"]
        if arch == "topk":
            keep = torch.zeros_like(pre, dtype=torch.bool)
            keep.scatter_(1, pre.argsort(dim=1, descending=True, stable=True)[:, :cfg["k"]], True)
            f = torch.where(keep, torch.clamp(pre, min=0), 0.0)
        elif arch == "jumprelu":
            f = torch.where(pre > p["threshold"], torch.clamp(pre, min=0), 0.0)
        else:
            f = torch.clamp(pre, min=0)
    return f, back(f @ p["W_dec"] + p["b_dec"])


def reference_decode(cfg: dict, params: dict, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """decode(f) in x's scale: the reference encoder's reconstruction with other features."""
    p = {k: v.double() for k, v in params.items()}
    x = x.double()
    norm = cfg.get("normalize_activations", "none")
    y = f @ p["W_dec"] + p["b_dec"]
    if norm == "constant_norm_rescale":
        return y / (x.shape[1] ** 0.5 / torch.linalg.vector_norm(x, dim=1, keepdim=True))
    if norm == "layer_norm":
        mu = x.mean(1, keepdim=True)
        return y * (x - mu).std(1, keepdim=True) + mu
    return y


def real_gpt2_available() -> bool:
    from huggingface_hub import try_to_load_from_cache

    for repo in ("openai-community/gpt2", "gpt2"):
        found = try_to_load_from_cache(repo, "model.safetensors")
        if isinstance(found, str) and os.path.exists(found):
            return True
    return False
