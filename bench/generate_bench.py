"""POST /generate on GPT-2 small, one run, ratios: the server's token-by-token generation (one
worker chunk per token, KV cache) against plain Hugging Face `generate` on the same weights.

    python -m bench.generate_bench [--quick] [--markdown FILE]

GPT-2-small shape (seeded random weights: the same compute as real GPT-2), CPU, a 32-token
prompt. Runs alternate and each side's median is used, so machine drift hits both. Reported:

- tokens per second for 64 greedy tokens: HF `generate` (eager attention, its KV cache) against
  /generate with `alternatives: 0`, with the default 5 alternatives (entropy is always computed),
  and with a steering vector at layer 6;
- streaming: time to the first event over waitress against one HF forward of the prompt plus one
  cached step;
- peak RSS above the start of a 512-token generation (the prompt plus 480 new tokens);
- a warm `/attention` request's latency alone and while a generation runs.
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

import torch

from bench.causal_bench import setup, timed
from tests.helpers import waitress_serving

PROMPT_TOKENS = 32
NEW_TOKENS = 64


def prompt_text(ex: Any) -> str:
    """A text of PROMPT_TOKENS tokens (BOS included)."""
    words = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun " * 8).split()
    for n in range(1, len(words)):
        text = " ".join(words[:n])
        if len(ex.tokens(text)[0]) >= PROMPT_TOKENS:
            return text
    raise ValueError("prompt too short")


def median_of(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each callable, run in alternation."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def first_event_seconds(port: int, body: dict) -> float:
    """Seconds from sending a streamed request to reading its first event's first line."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    seconds = time.perf_counter() - start
    response.read()
    conn.close()
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, a 256-token memory run")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    repeats = 3 if args.quick else 5
    torch.set_grad_enabled(False)
    model, client = setup()
    ex = client.application.extensions["explorer"]
    text = prompt_text(ex)
    ids = torch.tensor([list(ex.tokens(text)[0])])
    hf = model.bridge.original_model
    vector = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(0)).tolist()
    body = {"prompt": text, "max_new_tokens": NEW_TOKENS}
    steer = [{"layer": 6, "vector": {"kind": "values", "values": vector}, "coefficient": 2.0}]

    def ours(**extra: Any) -> Callable[[], Any]:
        def run() -> Any:
            r = client.post("/generate", json={**body, **extra})
            assert r.status_code == 200, r.get_json()
            return r.get_json()
        return run

    def hf_generate() -> Any:
        return hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)

    same = ours(alternatives=0)()["token_ids"] == hf_generate()[0].tolist()
    hf_s, plain_s, alt_s, steer_s = median_of(
        [hf_generate, ours(alternatives=0), ours(), ours(steer=steer)], repeats)
    rows = [("HF generate (eager, KV cache)", hf_s, 1.0),
            ("/generate, alternatives 0", plain_s, hf_s / plain_s),
            ("/generate, 5 alternatives (default)", alt_s, hf_s / alt_s),
            ("/generate, 5 alternatives, steered at layer 6", steer_s, hf_s / steer_s)]

    def hf_first() -> Any:  # the prompt's pass, then one cached step
        out = hf(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return hf(nxt, past_key_values=out.past_key_values, use_cache=True)

    with waitress_serving(client.application, channel_request_lookahead=4) as server:
        port = server.effective_port
        stream_body = {**body, "max_new_tokens": 8, "stream": True}
        firsts, hf_firsts = [], []
        for _ in range(repeats):
            firsts.append(first_event_seconds(port, stream_body))
            start = time.perf_counter()
            hf_first()
            hf_firsts.append(time.perf_counter() - start)
        first_s, hf_first_s = statistics.median(firsts), statistics.median(hf_firsts)

        # a warm /attention alone, then while a generation runs
        att = {"text": text, "layer": 5}
        client.post("/attention", json=att)
        alone = statistics.median(timed(lambda: client.post("/attention", json=att))[0] for _ in range(repeats))
        running = threading.Event()
        long = threading.Thread(target=lambda: (running.set(), client.post("/generate", json={
            **body, "max_new_tokens": 200})))
        long.start()
        running.wait()
        time.sleep(0.5)
        during = [timed(lambda: client.post("/attention", json=att))[0] for _ in range(repeats)]
        long.join()
    new = (256 if args.quick else 512) - PROMPT_TOKENS
    mem_s, mem_mb, _ = timed(ours(max_new_tokens=new))

    lines = [f"Generation on GPT-2 small (random weights), CPU ({platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}), prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new, median of {repeats}.",
             "", f"Greedy tokens identical to HF generate: {same}.", "",
             "| run | seconds | tokens/s | vs HF |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {NEW_TOKENS / s:.1f} | {ratio:.2f}x |" for name, s, ratio in rows]
    lines += ["", f"Steering costs {steer_s / alt_s - 1:+.1%} over the same request unsteered.",
              f"Streaming: first event after {first_s * 1000:.0f} ms; HF prompt pass + one cached step "
              f"{hf_first_s * 1000:.0f} ms: ratio {first_s / hf_first_s:.2f}.",
              f"{PROMPT_TOKENS + new}-token generation: {mem_s:.1f} s, peak RSS {mem_mb:.0f} MB above its start.",
              f"Warm /attention (layer 5): {alone * 1000:.1f} ms alone, median {statistics.median(during) * 1000:.1f} ms "
              f"(max {max(during) * 1000:.1f}) while a 200-token generation runs."]
    out = "\n".join(lines)
    print(out)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(out + "\n")


if __name__ == "__main__":
    sys.exit(main())
