"""/attention precision and size, before and after issue 15, on a GPT-2-small-shaped random model.

Reference: plain HF transformers (eager attention, output_attentions) on the same weights, in
float32. "before" reproduces the old answer (float16 cache of the weight, rounded to 4 decimal
places); "after" is today's default (float16 cache of weight * 2^15, 4 significant digits);
"full" is `"precision": "full"` (float32, recomputed per layer). Sizes are one all-heads
/attention answer (one layer) at 1024 tokens, serialized as the server does.

    .venv/bin/python -m bench.attention_precision
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
import orjson
import torch

from explorer.math import forward as analysis
from explorer.operations.precision import attention_weights
from explorer.runtime.engine import tune_allocator
from model_utils import load_model, random_gpt2

SEQ = 1024
SIZE_LAYER = 5


def text_ids(tokenizer, n: int) -> list[int]:
    words = "the model reads each token of this text and attends to the ones before it".split()
    ids = [tokenizer.bos_token_id]
    i = 0
    while len(ids) < n:
        ids += tokenizer.encode(" " + words[i % len(words)])
        i += 1
    return ids[:n]


def figures(name: str, got: np.ndarray, ref: np.ndarray) -> None:
    """Max relative error over weights >= 1e-4, nonzero weights reported as 0, worst row sum."""
    big = ref >= 1e-4
    rel = float((np.abs(got[big] - ref[big]) / ref[big]).max())
    zeros = int(((ref > 0) & (got == 0)).sum())
    row = float(np.abs(got.sum(-1) - 1).max())
    print(f"{name:<8} max rel err (w >= 1e-4) {rel:9.2e}   nonzero -> 0: {zeros:>9} of {int((ref > 0).sum())}"
          f"   worst |row sum - 1| {row:8.1e}")


def best(fn, reps: int = 5) -> float:
    """Fastest of `reps` timed calls (seconds)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dumps(matrix: np.ndarray) -> tuple[int, float]:
    start = time.perf_counter()
    body = orjson.dumps({"attention_matrix": matrix}, option=orjson.OPT_SERIALIZE_NUMPY)
    return len(body), time.perf_counter() - start


def main() -> None:
    from transformers import GPT2LMHeadModel

    torch.set_grad_enabled(False)
    tune_allocator()  # as the server does
    with tempfile.TemporaryDirectory() as tmp:
        random_gpt2(tmp).save_pretrained(tmp)
        model = load_model(tmp, device="cpu")
        hf = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="eager").eval()
    cfg = model.cfg
    print(f"GPT-2-small-shaped random model: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}; "
          f"{SEQ} tokens; CPU threads {torch.get_num_threads()}")
    ids = text_ids(model.tokenizer, SEQ)
    with torch.inference_mode():
        ref = torch.stack(hf(torch.tensor([ids]), output_attentions=True).attentions)[:, 0].double().numpy()
        del hf
        new_store = analysis.store_pattern
        old_store = lambda out, pattern: out.copy_(pattern)  # noqa: E731  (the old unscaled cache)
        forward_seconds: dict[str, list[float]] = {"old": [], "new": []}
        runs = {}
        for _ in range(2):  # interleaved: the machine's load drifts
            for name, store in (("old", old_store), ("new", new_store)):
                analysis.store_pattern = store
                start = time.perf_counter()
                runs[name] = analysis.forward(model.bridge, ids)
                forward_seconds[name].append(time.perf_counter() - start)
        analysis.store_pattern = new_store
        old_run, run = runs["old"], runs["new"]
        start = time.perf_counter()
        full = np.stack([analysis.layer_pattern(model.bridge, ids, l) for l in range(int(cfg.n_layers))])
        t_full = (time.perf_counter() - start) / int(cfg.n_layers)
        one = torch.from_numpy(full[SIZE_LAYER])
        cache = torch.empty(one.shape, dtype=torch.float16)
        t_copy = best(lambda: cache.copy_(one))
        t_store = best(lambda: analysis.store_pattern(cache, one))

    before = np.stack([np.round(old_run.patterns[l].float().numpy(), 4) for l in range(int(cfg.n_layers))])
    after = np.stack([attention_weights(run.patterns[l]) for l in range(int(cfg.n_layers))])
    t_read_old = best(lambda: np.round(old_run.patterns[SIZE_LAYER].float().numpy(), 4))
    t_read_new = best(lambda: attention_weights(run.patterns[SIZE_LAYER]))
    print("\nErrors against HF eager float32, every layer and head:")
    figures("before", before.astype(np.float64), ref)
    figures("after", after, ref)
    figures("full", full.astype(np.float64), ref)

    print(f"\nAll-heads answer for layer {SIZE_LAYER} at {SEQ} tokens:")
    sizes = {}
    for name, matrix in (("before", before[SIZE_LAYER]), ("after", after[SIZE_LAYER]), ("full", full[SIZE_LAYER])):
        sizes[name], seconds = dumps(matrix)
        print(f"{name:<8} JSON {sizes[name] / 1e6:6.1f} MB ({sizes[name] / sizes['before']:.2f}x before), "
              f"serialized in {seconds:.2f} s")
    print(f"\nOne layer's values from the cache: {t_read_old * 1000:.0f} ms before (np.round), "
          f"{t_read_new * 1000:.0f} ms after (lookup table); 'full' recomputes a layer in {t_full:.2f} s "
          f"(mean over layers: a forward pass up to it)")
    print(f"Storing one layer's pattern in the cache: {t_copy * 1000:.1f} ms before (float16 copy), "
          f"{t_store * 1000:.1f} ms after (scaled, tiny weights kept nonzero); x{cfg.n_layers} layers")
    old_f, new_f = min(forward_seconds["old"]), min(forward_seconds["new"])
    print(f"Forward pass at {SEQ} tokens (best of 2, interleaved): {old_f:.2f} s before, {new_f:.2f} s after "
          f"({new_f / old_f:.2f}x)")


if __name__ == "__main__":
    main()
