"""POST /features on GPT-2 small with a 16k-feature SAE, one run, ratios.

    python -m bench.features_bench [--quick] [--markdown FILE]

GPT-2-small shape (seeded random weights: the same compute as real GPT-2) and a random standard
SAE (d_in 768, d_sae 16384, about 1% of the features active on a token, as in trained ones) on
blocks.6.hook_resid_pre, CPU, a 128-token text. Each measurement
is the median over fresh texts, alternating the sides, so machine drift hits both. Reported:

- cold /features on a text whose run is cached (the encoding alone, server side) against one
  cold forward pass of the same length (/tokenize-free: the run itself, `Explorer.run`);
- warm /features (features cached), server-side time from the Server-Timing header;
- /feature with an ablation of 16 features in turn (batched replays from block 6);
- memory: the SAE's parameters, one text's cached features, and peak RSS above the start of a
  cold /features.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from typing import Any

import torch

from bench.causal_bench import timed
from explorer.runtime.engine import tune_allocator
from model_utils import load_model, write_random_sae
from app import create_app

TOKENS = 128
D_SAE = 16384
HOOK = "blocks.6.hook_resid_pre"
WORDS = ("the quick brown fox jumps over a lazy dog while seven cats sleep in warm sun near old river "
         "banks and children play games of chess under tall green trees every single summer day").split()


def text_of(ex: Any, seed: int) -> str:
    """A fresh text of TOKENS tokens (BOS included): the word list rotated by `seed`."""
    words = WORDS[seed % len(WORDS):] + WORDS[:seed % len(WORDS)]
    out: list[str] = []
    while len(ex.tokens(" ".join(out))[0] if out else ()) < TOKENS:
        out.append(words[len(out) % len(words)])
    return " ".join(out)


def server_ms(response: Any) -> float:
    return float(response.headers["Server-Timing"].split("dur=")[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    repeats = 3 if args.quick else 9
    tune_allocator()
    torch.manual_seed(0)
    model = load_model("gpt2", random_weights=True, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_sae(tmp, d_in=768, d_sae=D_SAE, hook=HOOK, scale=6.3, seed=1, active=0.01)
        client = create_app({"TESTING": True, "SAES": [f"name=s,{path}"]}, model=model).test_client()
        ex = client.application.extensions["explorer"]
        sae = ex.sae("s")
        ex.run(text_of(ex, 999))  # warm-up: allocator and kernels
        client.post("/features", json={"text": text_of(ex, 999), "sae": "s"})
        forward, encode, warm, peaks = [], [], [], []
        for i in range(repeats):
            text = text_of(ex, i)
            seconds, _, _ = timed(lambda: ex.run(text))  # the cold forward, cached from here on
            forward.append(seconds * 1000)
            r = client.post("/features", json={"text": text, "sae": "s"})
            encode.append(server_ms(r))
            warm.append(server_ms(client.post("/features", json={"text": text, "sae": "s"})))
            other = text_of(ex, 100 + i)
            ex.run(other)
            peaks.append(timed(lambda: client.post("/features", json={"text": other, "sae": "s"}))[1])
        ablate = []
        for i in range(max(1, repeats // 3)):
            text = text_of(ex, 200 + i)
            ex.acts(text)
            body = {"text": text, "sae": "s", "index": 0, "answer": " the", "edit": "ablate", "indices": list(range(16))}
            ablate.append(server_ms(client.post("/feature", json=body)))
        med = statistics.median
        features_bytes = TOKENS * D_SAE * 4
        rows = [
            ("cold forward pass, 128 tokens (ms)", f"{med(forward):.1f}"),
            ("cold /features on the cached run (ms, server)", f"{med(encode):.1f}"),
            ("ratio: /features / forward (goal <= 0.25)", f"{med(encode) / med(forward):.3f}"),
            ("warm /features (ms, server; goal <= 5)", f"{med(warm):.2f}"),
            ("/feature ablating 16 features in turn (ms, server)", f"{med(ablate):.0f}"),
            ("SAE parameters (MB)", f"{sae.nbytes / 2**20:.0f}"),
            ("one text's cached features (MB)", f"{features_bytes / 2**20:.1f}"),
            ("peak RSS above start of a cold /features (MB)", f"{med(peaks):.0f}"),
        ]
    head = (f"features bench: GPT-2 small shape, SAE d_sae {D_SAE} at {HOOK}, {TOKENS} tokens, "
            f"{repeats} repeats, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads")
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(head + "\n\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# /features benchmark\n\n{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
