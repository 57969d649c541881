"""Activation patching and causal tracing against `transformer_lens.patching`, one run.

    python -m bench.causal_bench [--quick] [--markdown FILE]

GPT-2-small shape (seeded random weights: the same compute as real GPT-2), CPU, 16-token prompt
pairs. Ours is the `/patch` endpoint through Flask's test client with an empty cache (so it pays
both prompts' forward passes); the reference is the matching `transformer_lens.patching` function
given a ready clean cache (its clean forward is not counted). Runs alternate (ours, library,
ours, ...) and each side's median is used, so machine drift hits both. Two pairs: the
indirect-object pair, which differs at position 10 (cells before it are exact no-ops ours skips),
and a pair that differs at position 1, where every cell runs. Peak memory: each sweep runs once
more in a fresh process (the server's allocator keeps freed memory, so only a process's first
sweep shows its peak), measured as resident size above the level just before it, sampled every 5 ms.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching draws a progress bar per sweep

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from explorer.operations.base import parse_target  # noqa: E402
from explorer.runtime.engine import tune_allocator  # noqa: E402
from explorer.runtime.loading import load_model  # noqa: E402

PAIRS = {
    "IOI (differ at 10)": ("When Mary and John went to the store, John gave a cold drink to",
                           "When Mary and John went to the store, Mary gave a cold drink to", " Mary", " John"),
    "differ at 1": ("John and Mary went to the store, and then Mary gave a drink to",
                    "Alice and Mary went to the store, and then Mary gave a drink to", " John", " Alice"),
}
LIBRARY = {"resid_pre": "get_act_patch_resid_pre", "attn_out": "get_act_patch_attn_out",
           "mlp_out": "get_act_patch_mlp_out", "heads": "get_act_patch_attn_head_out_all_pos"}
LONG_CLEAN = ("When Mary and John went to the store after a long day at work in the "
              "old part of the city, where the streets are narrow and the shops close early, John gave a "
              "cold drink and a sandwich to his friend, who thanked him and then said that "
              "the next time it would be her turn to pay for")  # 64 tokens with BOS


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident size above the level at entry (MB), sampled in a thread."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def above(self) -> float:
        return self.peak - self.base


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(seconds, peak MB above start, result)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.above, result


def setup() -> tuple[Any, Any]:
    """(model, Flask test client) as the server runs: tuned allocator, seeded random GPT-2 small."""
    tune_allocator()
    model = load_model("gpt2", random_weights=True, device="cpu")
    return model, create_app({"TESTING": True}, model=model).test_client()


def sweep_memory(kind: str, pair: str, site: str) -> float:
    """Peak MB above the start of one sweep (ours or the library's), in this fresh process."""
    from transformer_lens import patching as library

    model, client = setup()
    clean, corrupt, answer, distractor = PAIRS[pair]
    ex = client.application.extensions["explorer"]
    ids = [torch.tensor([list(ex.tokens(t)[0])]) for t in (clean, corrupt)]
    target = parse_target(ex, answer, distractor)
    with torch.inference_mode():
        _, clean_cache = model.bridge.run_with_cache(ids[0])
        model.bridge(ids[1])  # one forward of this length first: its memory is not the sweep's
    if kind == "ours":
        body = {"clean": clean, "corrupt": corrupt, "answer": answer, "distractor": distractor, "site": site}
        return timed(lambda: client.post("/patch", json=body))[1]
    metric = lambda logits: logits[0, -1, target.answer] - logits[0, -1, target.distractor]  # noqa: E731
    with torch.inference_mode():
        return timed(lambda: getattr(library, LIBRARY[site])(model.bridge, ids[1], clean_cache, metric))[1]


def fresh_memory(kind: str, pair: str, site: str) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.causal_bench", "--memory", kind, pair, site],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition, resid_pre and heads, no memory runs")
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--memory", nargs=3, metavar=("KIND", "PAIR", "SITE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        print(sweep_memory(*args.memory))
        return 0
    from transformer_lens import patching as library

    model, client = setup()
    ex = client.application.extensions["explorer"]
    bridge = model.bridge
    repeats = 1 if args.quick else 3
    sites = ("resid_pre", "heads") if args.quick else tuple(LIBRARY)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). Model: GPT-2-small shape (12 layers, 12 heads, "
             "d_model 768), seeded random weights, float32, CPU. Medians of "
             f"{repeats} alternating runs per side.", "",
             "| pair | site | cells | cells run | ours s | library s | library / ours | ours peak MB | library peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for pair_name, (clean, corrupt, answer, distractor) in PAIRS.items():
        ids = [list(ex.tokens(t)[0]) for t in (clean, corrupt)]
        assert len(ids[0]) == len(ids[1]) == 16, [len(i) for i in ids]
        target = parse_target(ex, answer, distractor)
        metric = lambda logits: logits[0, -1, target.answer] - logits[0, -1, target.distractor]  # noqa: E731
        with torch.inference_mode():
            _, clean_cache = bridge.run_with_cache(torch.tensor([ids[0]]))
        for site in sites:
            body = {"clean": clean, "corrupt": corrupt, "answer": answer, "distractor": distractor, "site": site}

            def ours() -> dict:
                ex.cache.clear()  # cold: both prompts' forward passes are counted
                r = client.post("/patch", json=body)
                assert r.status_code == 200, r.get_json()
                return r.get_json()

            def reference() -> torch.Tensor:
                with torch.inference_mode():
                    return getattr(library, LIBRARY[site])(bridge, torch.tensor([ids[1]]), clean_cache, metric)

            runs = [(timed(ours), timed(reference)) for _ in range(repeats)]
            ours_s = statistics.median(o[0] for o, _ in runs)
            ref_s = statistics.median(r[0] for _, r in runs)
            got, want = runs[-1][0][2], runs[-1][1][2]
            diff = float((torch.tensor(got["effect"]) - want).abs().max())
            assert diff < 1e-3, f"{site}: grids differ by {diff}"
            cells = int(want.numel())
            memory = ("-", "-") if args.quick else tuple(f"{fresh_memory(k, pair_name, site):.0f}"
                                                          for k in ("ours", "library"))
            lines.append(f"| {pair_name} | {site} | {cells} | {got['cells_computed']} | {ours_s:.2f} | "
                         f"{ref_s:.2f} | {ref_s / ours_s:.1f}x | {memory[0]} | {memory[1]} |")
            print(lines[-1], flush=True)
    long = {"clean": LONG_CLEAN, "corrupt": LONG_CLEAN.replace("John gave", "Mary gave"), "answer": " Mary",
            "distractor": " John", "site": "resid_pre"}
    seq = len(ex.tokens(LONG_CLEAN)[0])
    assert seq == 64, f"LONG_CLEAN is {seq} tokens, not 64"
    ex.cache.clear()
    seconds, _, result = timed(lambda: client.post("/patch", json=long).get_json())
    lines += ["", f"- {seq}-token `resid_pre` sweep ({ex.model.cfg.n_layers * seq} cells, {result['cells_computed']} run): "
              f"{seconds:.1f} s."]
    trace = {"text": "The Eiffel Tower is in the city of", "subject": "Eiffel Tower", "samples": 10}
    for kind in ("resid", "mlp", "attn"):
        ex.cache.clear()
        seconds, _, result = timed(lambda: client.post("/causal_trace", json={**trace, "kind": kind}).get_json())
        lines.append(f"- `/causal_trace` kind `{kind}`, {len(result['tokens'])} tokens, 10 samples: {seconds:.1f} s.")
    report = "\n".join(lines)
    print("\n" + report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
