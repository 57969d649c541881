"""Benchmark the Jacobian lens against the logit lens, and the time to fit one.

    python -m bench.jlens_bench [--quick] [--device cuda] [--fit-tokens N]

On a GPT-2-small-shaped model (seeded random weights: the same compute as real GPT-2), in one
process:

- `/lens` with `"lens": "jacobian"` on every position of a new 128-token text (cold: its forward
  pass included) against `/lens` with the logit lens on another new text of the same length, the
  two interleaved, alternating which goes first, so machine noise hits both alike (the goal:
  at most 1.3x);
- the same Jacobian `/lens` request again (warm: read from the cache) against its cold time;
- fitting: `POST /jobs/jlens_fit` on texts of `--fit-tokens` tokens (default 128, as the
  library's default `max_seq_len`), seconds per text and per chunk (one backward pass); a cold
  `/predict` on a new short text while the fit runs against the same request idle (it waits for
  at most the chunk running); a DELETE inside the first text of another fit until it is
  cancelled. The lens of the readout rows is an identity plus noise: its values change no timing.

Times are server-side (the Flask app in process, JSON encoding included); ratios are medians of
per-pair ratios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from bench.bench import Texts, median  # noqa: E402
from bench.lens_bench import LENS_TOKENS, print_rows, request  # noqa: E402
from explorer.runtime import jlens  # noqa: E402
from explorer.runtime.engine import tune_allocator  # noqa: E402
from explorer.runtime.loading import load_model, random_gpt2  # noqa: E402


def noisy_lens(cfg: Any) -> Any:
    from transformer_lens.tools.analysis import JacobianLens

    d_model, gen = int(cfg.d_model), torch.Generator().manual_seed(0)
    return JacobianLens({l: torch.eye(d_model) + torch.randn(d_model, d_model, generator=gen) / d_model
                         for l in range(int(cfg.n_layers) - 1)}, n_prompts=1, d_model=d_model)


def run(model_dir: str, quick: bool, device: str, fit_tokens: int, lens_dir: str) -> list[tuple[str, float, float, float]]:
    model = load_model(model_dir, device=device)
    model.lenses["bench"] = jlens.LoadedLens("bench", noisy_lens(model.cfg), {"kind": "file", "path": "(bench)"})
    app = create_app({"JLENS_DIR": lens_dir}, model=model)
    client = app.test_client()
    texts = Texts(model.tokenizer)
    jacobian = {"lens": "jacobian"}
    for extra in ({}, jacobian):  # warm up code paths
        request(client, "/lens", {"text": texts.make(8), **extra})
    reps = 2 if quick else 7
    cold_j, cold_l, warm_j, seen = [], [], [], []
    for rep in range(reps):
        text_j, text_l = texts.make(LENS_TOKENS), texts.make(LENS_TOKENS)
        order = [(cold_j, text_j, jacobian), (cold_l, text_l, {})]
        for times, text, extra in order if rep % 2 == 0 else order[::-1]:
            times.append(request(client, "/lens", {"text": text, **extra}))
        seen.append(text_j)
    for text in seen:
        warm_j += [request(client, "/lens", {"text": text, **jacobian}) for _ in range(3)]
    n_fit = 1 if quick else 2
    fit = fitting(client, texts, fit_tokens, n_fit, int(model.cfg.d_model))
    app.extensions["explorer"].worker.wait_idle(60)
    return [
        (f"/lens jacobian cold / logit cold, {LENS_TOKENS} tokens, all positions", median(cold_j), median(cold_l),
         median([j / l for j, l in zip(cold_j, cold_l)])),
        (f"/lens jacobian warm / cold, same {LENS_TOKENS}-token text (cold is how many times warm)", median(warm_j),
         median(cold_j), median(cold_j) / median(warm_j)),
        (f"/jobs/jlens_fit, ms per {fit_tokens}-token text ({n_fit} texts; no reference)", fit["per_text"], float("nan"),
         float("nan")),
        (f"/jobs/jlens_fit, ms per chunk (one backward pass; {fit['chunks']} chunks) / per text", fit["per_chunk"],
         fit["per_text"], fit["per_chunk"] / fit["per_text"]),
        (f"/predict cold, new {PROBE_TOKENS}-token text, during a fit / idle (median of {len(fit['busy'])})",
         median(fit["busy"]), median(fit["idle"]), median(fit["busy"]) / median(fit["idle"])),
        ("DELETE of a fit inside its first text -> cancelled, ms / ms per chunk", fit["cancel"], fit["per_chunk"],
         fit["cancel"] / fit["per_chunk"]),
    ]


PROBE_TOKENS = 16


def wait(client: Any, job: str, until: Any) -> dict[str, Any]:
    while not until(state := client.get(f"/jobs/{job}").get_json()):
        time.sleep(0.05)
    return state


def fitting(client: Any, texts: Texts, fit_tokens: int, n_fit: int, d_model: int) -> dict[str, Any]:
    """Fit `n_fit` texts as a job, asking `/predict` about new texts meanwhile (and idle, before);
    then start another fit and cancel it inside its first text. Times in ms."""
    probe = {"token_index": 0, "top_k": 5}
    idle = [request(client, "/predict", {"text": texts.make(PROBE_TOKENS), **probe}) for _ in range(3)]
    start = time.perf_counter()
    r = client.post("/jobs/jlens_fit", json={"texts": [texts.make(fit_tokens) for _ in range(n_fit)], "name": "fit",
                                             "max_seq_len": fit_tokens})
    if r.status_code != 202:
        raise RuntimeError(f"/jobs/jlens_fit -> {r.status_code}: {r.get_data()[:300]!r}")
    job, busy = r.get_json()["job"], []
    while (state := client.get(f"/jobs/{job}").get_json())["status"] not in ("done", "error", "cancelled"):
        if state["status"] == "running" and len(busy) < 5:
            busy.append(request(client, "/predict", {"text": texts.make(PROBE_TOKENS), **probe}))
        time.sleep(1.0)
    if state["status"] != "done":
        raise RuntimeError(f"the fit ended {state['status']}: {state.get('error')}")
    total = (time.perf_counter() - start) * 1000
    chunks = n_fit * jlens.backward_passes(d_model)
    r = client.post("/jobs/jlens_fit", json={"texts": [texts.make(fit_tokens)], "name": "cancelled",
                                             "max_seq_len": fit_tokens})
    job = r.get_json()["job"]
    wait(client, job, lambda s: s["progress"] > 0)
    cancelled = time.perf_counter()
    client.delete(f"/jobs/{job}")
    wait(client, job, lambda s: s["status"] == "cancelled")
    return {"per_text": total / n_fit, "chunks": chunks, "per_chunk": total / chunks, "idle": idle, "busy": busy,
            "cancel": (time.perf_counter() - cancelled) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--fit-tokens", type=int, default=LENS_TOKENS, help="tokens per fitted text (default 128)")
    args = parser.parse_args()
    tune_allocator()  # as app.py does
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as model_dir, \
            tempfile.TemporaryDirectory(prefix="bench-jlens-") as lens_dir:
        random_gpt2(model_dir).save_pretrained(model_dir)
        rows = run(model_dir, args.quick, args.device, args.fit_tokens, lens_dir)
    print_rows(rows, args.quick, args.device, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
