"""Which-heads endpoints on GPT-2 small, one run: attribution patching against real patching,
the batched ablation sweep against a one-forward-per-head loop, causal head gating per step.

    python -m bench.heads_bench [--quick] [--markdown FILE]

GPT-2-small shape (seeded random weights: the same compute as real GPT-2), CPU, the 16-token
indirect-object pair of bench/causal_bench.py. Endpoints run through Flask's test client with an
empty cache (each pays its prompts' forward passes). Runs alternate and each side's median is used,
so machine drift hits both.

- `/attribution_patch` vs `/patch`, `heads` site: the gradient estimate against the sweep it
  approximates, and their agreement.
- `/ablate` (mean, heads) vs a loop of one full forward pass per head with a hook that writes the
  head's mean into `hook_z`, full logits, as the TransformerLens demos do; the grids must agree.
- CHG: seconds per optimiser step on 8 short prompts (GPT-2 small, all 144 gates), and (without
  --quick) a whole job with the defaults, the time the README states.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from bench.causal_bench import PAIRS, setup, timed
from explorer.operations import chg
from explorer.operations.base import parse_target

CHG_PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", " Mary"),
    ("When Tom and Anna went to the park, Anna gave a ball to", " Tom"),
    ("When Lisa and Mark went to the office, Mark gave a letter to", " Lisa"),
    ("When Paul and Emma went to the beach, Emma gave a towel to", " Paul"),
    ("When Kate and Jack went to the school, Jack gave a book to", " Kate"),
    ("When Sam and Lucy went to the market, Lucy gave an apple to", " Sam"),
    ("When Ben and Sara went to the cinema, Sara gave a ticket to", " Ben"),
    ("When Anna and Paul went to the garden, Paul gave a flower to", " Anna"),
]


def median_pair(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float, Any, Any]:
    """Median seconds of each of two alternating callables, and their last results."""
    runs = [(timed(first), timed(second)) for _ in range(repeats)]
    return (statistics.median(a[0] for a, _ in runs), statistics.median(b[0] for _, b in runs),
            runs[-1][0][2], runs[-1][1][2])


def head_loop(ex: Any, text: str, target: Any) -> torch.Tensor:
    """Mean ablation of every head with one full forward pass each: [n_layers, n_heads] of the
    metric after ablation minus baseline."""
    bridge, cfg = ex.model.bridge, ex.model.cfg
    tokens = torch.tensor([list(ex.tokens(text)[0])])
    with torch.inference_mode():
        z_mean = ex.acts(text).z.mean(1)  # [n_layers, n_heads, d_head]
        baseline = target.metric(bridge(tokens)[0, -1])
        grid = torch.empty(int(cfg.n_layers), int(cfg.n_heads))
        for layer in range(int(cfg.n_layers)):
            for head in range(int(cfg.n_heads)):
                def hook(z: torch.Tensor, hook: Any, layer: int = layer, head: int = head) -> torch.Tensor:
                    z = z.clone()
                    z[:, :, head] = z_mean[layer, head]
                    return z
                with bridge.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]):
                    grid[layer, head] = target.metric(bridge(tokens)[0, -1]) - baseline
    return grid


def post(client: Any, path: str, body: dict) -> dict:
    r = client.post(path, json=body)
    assert r.status_code in (200, 202), r.get_json()
    return r.get_json()


def chg_run(client: Any, steps: int) -> tuple[float, float, dict]:
    """(seconds, seconds per optimiser step, finished job) of one CHG job on the 8 prompts. Per step:
    between the first and the last progress seen, so the set-up and evaluation passes are not counted."""
    start = time.perf_counter()
    job = post(client, "/jobs/chg", {"texts": [t for t, _ in CHG_PROMPTS], "targets": [a for _, a in CHG_PROMPTS],
                                     "steps": steps})["job"]
    seen: list[tuple[float, float]] = []  # (time, steps done)
    while (state := client.get(f"/jobs/{job}").get_json())["status"] not in ("done", "error", "cancelled"):
        if state["progress"] > 0 and (not seen or seen[-1][1] != state["progress"] * 3 * steps):
            seen.append((time.perf_counter(), state["progress"] * 3 * steps))
        time.sleep(0.01)
    assert state["status"] == "done" and len(seen) > 1, state
    return time.perf_counter() - start, (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1]), state


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, 2 CHG steps per stage, no full CHG job")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args()
    model, client = setup()
    ex = client.application.extensions["explorer"]
    repeats = 1 if args.quick else 3
    clean, corrupt, answer, distractor = PAIRS["IOI (differ at 10)"]
    pair = {"clean": clean, "corrupt": corrupt, "answer": answer, "distractor": distractor, "site": "heads"}
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). Model: GPT-2-small shape, seeded random weights, float32, "
             f"CPU. {len(ex.tokens(clean)[0])}-token prompts; medians of {repeats} alternating runs, cold cache.", "",
             "| measurement | ours s | reference s | ratio | agreement |", "|---|---:|---:|---:|---|"]

    def cold(path: str, body: dict) -> Callable[[], dict]:
        def run() -> dict:
            ex.cache.clear()
            return post(client, path, body)
        return run

    attribution_s, patch_s, est, real = median_pair(cold("/attribution_patch", pair), cold("/patch", pair), repeats)
    compared = post(client, "/attribution_patch", {**pair, "compare": True})
    lines.append(f"| `/attribution_patch` heads vs `/patch` heads | {attribution_s:.2f} | {patch_s:.2f} | "
                 f"{patch_s / attribution_s:.1f}x faster | Pearson {compared['pearson']:.3f}, "
                 f"max abs error {compared['max_abs_error']:.3g} |")
    print(lines[-1], flush=True)

    target = parse_target(ex, answer, distractor)
    ablate_body = {"text": clean, "answer": answer, "distractor": distractor}

    def loop() -> torch.Tensor:
        ex.cache.clear()
        return head_loop(ex, clean, target)

    ablate_s, loop_s, ours, theirs = median_pair(cold("/ablate", ablate_body), loop, repeats)
    diff = float((torch.tensor(ours["effect"]) - theirs).abs().max())
    assert diff < 1e-3, f"ablation grids differ by {diff}"
    lines.append(f"| `/ablate` heads (mean) vs one forward per head | {ablate_s:.2f} | {loop_s:.2f} | "
                 f"{loop_s / ablate_s:.1f}x faster | max abs diff {diff:.2g} |")
    print(lines[-1], flush=True)

    steps = 3 if args.quick else 10
    _, per_step, _ = chg_run(client, steps)
    lines.append(f"| CHG, 8 prompts, 144 gates: seconds per step | {per_step:.3f} | | | "
                 f"default job ({3 * chg.DEFAULT_STEPS} steps) about {per_step * 3 * chg.DEFAULT_STEPS / 60:.1f} min |")
    print(lines[-1], flush=True)
    if not args.quick:
        seconds, _, state = chg_run(client, chg.DEFAULT_STEPS)
        lines += ["", f"- A whole CHG job with the defaults (steps {chg.DEFAULT_STEPS} per stage, lr {chg.DEFAULT_LR}, "
                  f"lambda {chg.DEFAULT_LAMBDA}) on the 8 prompts: {seconds / 60:.1f} min; "
                  f"taxonomy counts {state['result']['counts']} (random weights)."]
    report = "\n".join(lines)
    print("\n" + report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
