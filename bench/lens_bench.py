"""Benchmark /lens and /score against the plain Hugging Face passes they replace.

    python -m bench.lens_bench [--quick] [--device cuda]

On a GPT-2-small-shaped model (seeded random weights: the same compute as real GPT-2), in one
process, each cold request interleaved with its reference on the same tokens so machine noise
hits both sides alike:

- `/lens` on every position of a 128-token text (no target, top_k 1), cold, against plain HF
  computing the same grid: one forward with every block's output kept, then
  `lm_head(ln_f(.))`, softmax, top-1, entropy and KL to the last layer for every layer and
  position (and against one plain HF forward, for scale);
- `/score` of 16 new texts of 32 tokens, cold, against one plain HF forward of the same padded
  batch with its log-softmax read at each next token;
- `/lens` warm (the same text again) against cold.

Times are server-side (the Flask app in process, JSON encoding included); ratios are medians of
per-pair ratios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from bench.bench import Texts, median, timed  # noqa: E402
from explorer.runtime.engine import tune_allocator  # noqa: E402
from explorer.runtime.loading import load_model, random_gpt2  # noqa: E402

LENS_TOKENS, SCORE_TEXTS, SCORE_TOKENS = 128, 16, 32


def hf_lens(hf: Any, ids: list[int]) -> None:
    """The lens grid in plain HF: every block's output through ln_f and lm_head, then what /lens reports."""
    outputs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
               for b in hf.transformer.h]
    try:
        hf(torch.tensor([ids], device=hf.device))
    finally:
        for h in handles:
            h.remove()
    logp = hf.lm_head(hf.transformer.ln_f(torch.stack(outputs)[:, 0])).float().log_softmax(-1)  # [L, seq, V]
    p = logp.exp()
    _ = p.max(-1), -(p * logp).sum(-1), (p[-1] * (logp[-1] - logp)).sum(-1)  # top-1, entropy, KL


def hf_score(hf: Any, batch: list[list[int]]) -> None:
    """Token log-probabilities of a right-padded batch in plain HF."""
    width = max(map(len, batch))
    tokens = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch], device=hf.device)
    logp = hf(tokens).logits.float().log_softmax(-1)
    _ = logp[:, :-1].gather(-1, tokens[:, 1:, None])


def request(client: Any, path: str, body: dict) -> float:
    """Milliseconds the app took for one request (from its Server-Timing header)."""
    r = client.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{path} -> {r.status_code}: {r.get_data()[:200]!r}")
    return float(r.headers["Server-Timing"].split("dur=")[1])


def paired(reps: int, make: Callable[[], Any], ours: Callable[[Any], float],
           reference: Callable[[Any], None]) -> tuple[list[float], list[float]]:
    """(our ms, reference ms) per repetition; each reference is the mean of runs before and after ours."""
    mine, refs = [], []
    for _ in range(reps):
        inputs = make()
        with torch.inference_mode():
            before = timed(lambda: reference(inputs))
        mine.append(ours(inputs))
        with torch.inference_mode():
            refs.append((before + timed(lambda: reference(inputs))) / 2)
    return mine, refs


def run(model_dir: str, quick: bool, device: str) -> list[tuple[str, float, float, float]]:
    from transformers import GPT2LMHeadModel

    model = load_model(model_dir, device=device)
    hf = GPT2LMHeadModel.from_pretrained(model_dir).to(model.cfg.device).eval()
    app = create_app(model=model)
    client = app.test_client()
    explorer = app.extensions["explorer"]
    texts = Texts(model.tokenizer)
    bos = model.tokenizer.bos_token_id

    def ids_of(text: str) -> list[int]:
        return [bos, *model.tokenizer.encode(text, add_special_tokens=False)]

    request(client, "/lens", {"text": texts.make(8)})  # warm up code paths
    request(client, "/score", {"texts": [texts.make(8), texts.make(9)]})
    reps = 2 if quick else 7
    lens_texts: list[str] = []

    def new_lens_text() -> str:
        lens_texts.append(texts.make(LENS_TOKENS))
        return lens_texts[-1]

    lens_cold, lens_hf = paired(reps, new_lens_text, lambda t: request(client, "/lens", {"text": t}),
                                lambda t: hf_lens(hf, ids_of(t)))
    with torch.inference_mode():
        forward = [timed(lambda: hf(torch.tensor([ids_of(t)], device=hf.device))) for t in lens_texts]
    lens_warm = [request(client, "/lens", {"text": t}) for t in lens_texts for _ in range(3)]
    score_cold, score_hf = paired(reps, lambda: [texts.make(SCORE_TOKENS) for _ in range(SCORE_TEXTS)],
                                  lambda batch: request(client, "/score", {"texts": batch}),
                                  lambda batch: hf_score(hf, [ids_of(t) for t in batch]))
    explorer.worker.wait_idle(60)
    return [
        (f"/lens cold, {LENS_TOKENS} tokens, all positions / plain HF lens grid", median(lens_cold), median(lens_hf),
         median([c / h for c, h in zip(lens_cold, lens_hf)])),
        (f"/lens cold, {LENS_TOKENS} tokens / one plain HF forward", median(lens_cold), median(forward),
         median([c / h for c, h in zip(lens_cold, forward)])),
        (f"/score cold, {SCORE_TEXTS} texts x {SCORE_TOKENS} tokens / one plain HF padded batch", median(score_cold),
         median(score_hf), median([c / h for c, h in zip(score_cold, score_hf)])),
        (f"/lens warm / cold, same {LENS_TOKENS}-token text (cold is how many times warm)", median(lens_warm),
         median(lens_cold), median(lens_cold) / median(lens_warm)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args()
    tune_allocator()  # as app.py does
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as model_dir:
        random_gpt2(model_dir).save_pretrained(model_dir)
        rows = run(model_dir, args.quick, args.device)
    print_rows(rows, args.quick, args.device, start)
    return 0


def print_rows(rows: list[tuple[str, float, float, float]], quick: bool, device: str, start: float) -> None:
    """The measurements as a markdown table, then the run's settings and duration."""
    print("| measurement | ours ms | reference ms | ratio |\n|---|---|---|---|")
    for name, ours, ref, ratio in rows:
        print(f"| {name} | {ours:.1f} | {ref:.1f} | {ratio:.2f}x |")
    print(f"({'quick, ' if quick else ''}{device}, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
