"""Benchmark the server on a GPT-2-small-shaped model (seeded random weights: same compute as real).

    make bench                      # or: python -m bench.bench [--markdown bench/RESULTS.md]

Part 1 serves the app with waitress on a local port inside this process, next to two references
on the same weights: one plain Hugging Face `GPT2LMHeadModel` forward (the floor any server pays)
and a naive server that re-runs the full `run_with_cache` for every request. Every ratio compares
runs made in this process, interleaved, so machine noise hits both sides alike.
Part 2 starts `python app.py --random-weights` as users do: time to the first answer, peak RSS
above the loaded model while serving 1024-token texts, and 8 concurrent clients on mixed
endpoints compared with one client.
"""
from __future__ import annotations

import argparse
import http.client
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import orjson
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from explorer.math import forward as analysis  # noqa: E402
from explorer.runtime.engine import tune_allocator  # noqa: E402
from explorer.runtime.loading import load_model, random_gpt2  # noqa: E402

LENGTHS = (8, 32, 128, 1024)  # tokens, BOS included
ENDPOINTS = ("attention", "predict", "trace")
PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
    "Within fifty years presses were running in more than two hundred European cities, and the "
    "price of books fell so quickly that reading spread from monasteries to merchants, students "
    "and artisans. Scholars argue about how much the press caused the Reformation or the "
    "scientific revolution, but nobody doubts that ideas began to travel faster than before. "
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """Keep-alive HTTP client; each call returns (status, body, server ms, wall ms)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, path: str, body: dict | None = None) -> tuple[int, bytes, float, float]:
        start = time.perf_counter()
        if body is None:
            self.conn.request("GET", path)
        else:
            self.conn.request("POST", path, orjson.dumps(body), {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        wall = (time.perf_counter() - start) * 1000
        timing = resp.getheader("Server-Timing", "app;dur=nan")
        return resp.status, data, float(timing.split("dur=")[1]), wall

    def ok(self, path: str, body: dict | None = None) -> tuple[bytes, float, float]:
        status, data, server, wall = self.call(path, body)
        if status != 200:
            raise RuntimeError(f"{path} {body and {k: v for k, v in body.items() if k != 'text'}} -> {status}: {data[:200]!r}")
        return data, server, wall


class Texts:
    """Distinct texts of an exact token length (BOS included)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids = tokenizer.encode(PARAGRAPH * 40, add_special_tokens=False)
        self.next_offset = 0

    def make(self, n_tokens: int) -> str:
        while True:
            self.next_offset += 1
            if self.next_offset + n_tokens > len(self.ids):
                raise RuntimeError(f"no more distinct {n_tokens}-token texts in the paragraph")
            text = self.tok.decode(self.ids[self.next_offset:self.next_offset + n_tokens - 1])
            if len(self.tok.encode(text, add_special_tokens=False)) == n_tokens - 1:
                return text


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def sync() -> None:
    """Wait for queued GPU work, so a timing covers it (a no-op on CPU)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def request_body(endpoint: str, text: str, seq: int, variant: int = 0) -> dict:
    """The request a user makes first (variant 0) or next (variant > 0: another layer, head,
    position or token selection) on a text of `seq` tokens."""
    if endpoint == "attention":
        return {"text": text, "layer": variant % 12, "head": (variant * 5) % 12}
    if endpoint == "predict":
        return {"text": text, "token_index": (seq // 2 + variant) % seq, "top_k": 10}
    if variant == 0:
        return {"text": text}
    # Every token but those at the set bits of `variant`: a selection never asked before.
    return {"text": text, "token_indices": [i for i in range(1, seq) if not (variant >> (i - 1)) & 1]}


def naive(bridge: Any, endpoint: str, ids: list[int], body: dict) -> None:
    """What a server without our cache does per request: a full run_with_cache, then the answer."""
    _, cache = bridge.run_with_cache(torch.tensor([ids], device=bridge.cfg.device))
    n_layers = int(bridge.cfg.n_layers)
    if endpoint == "attention":
        orjson.dumps(cache[analysis.pattern_hook(body["layer"])][0, body["head"]].tolist())
    elif endpoint == "predict":
        resid = torch.stack([cache[analysis.resid_hook(l)][0, body["token_index"]] for l in range(n_layers)])
        bridge.unembed(bridge.ln_final(resid[None]))[0].softmax(-1).topk(body["top_k"])
    else:
        from sklearn.decomposition import PCA

        resid = torch.stack([cache[analysis.resid_hook(l)][0, 1:] for l in range(n_layers)])
        PCA(n_components=2).fit_transform(resid.transpose(0, 1).reshape(-1, resid.shape[-1]).cpu().numpy())


def part1(model_dir: str, quick: bool, device: str) -> tuple[list[dict], dict, dict]:
    """In-process latency table, HTTP p50, and single-client answers for part 2's comparison."""
    from transformers import GPT2LMHeadModel
    from waitress.server import create_server

    model = load_model(model_dir, device=device)
    # default attention (sdpa): the real floor
    hf = GPT2LMHeadModel.from_pretrained(model_dir).to(model.cfg.device).eval()
    app = create_app(model=model)
    explorer = app.extensions["explorer"]
    port = free_port()
    server = create_server(app, host="127.0.0.1", port=port, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    client = Client(port)
    texts = Texts(model.tokenizer)
    bos = model.tokenizer.bos_token_id
    client.ok("/predict", {"text": texts.make(8), "token_index": 1})  # warm up code paths

    rows: list[dict] = []
    for seq in LENGTHS:
        reps = 2 if quick else 9 if seq <= 128 else 5  # short texts are cheap: more pairs, less noise
        warm_n = 5 if quick else 20
        res: dict[str, dict[str, list[float]]] = {e: {"hf": [], "cold": [], "naive": []} for e in ENDPOINTS}
        last: dict[str, str] = {}
        for _ in range(reps):
            for endpoint in ENDPOINTS:
                text = texts.make(seq)
                ids = [bos, *model.tokenizer.encode(text, add_special_tokens=False)]

                def hf_forward(ids: list[int] = ids) -> Any:
                    return hf(torch.tensor([ids], device=hf.device))

                explorer.worker.wait_idle(120)  # the previous text's prefetch must not bill this one
                with torch.inference_mode():
                    before = timed(hf_forward)
                body = request_body(endpoint, text, seq)
                _, server_ms, wall = client.ok(f"/{endpoint}", body)
                res[endpoint]["cold"].append(server_ms)
                explorer.worker.wait_idle(120)
                with torch.inference_mode():  # the app's worker is idle: the bridge is ours
                    res[endpoint]["hf"].append((before + timed(hf_forward)) / 2)
                    res[endpoint]["naive"].append(timed(lambda: naive(model.bridge, endpoint, ids, body)))
                last[endpoint] = text
        for endpoint in ENDPOINTS:
            text = last[endpoint]
            explorer.worker.wait_idle(120)  # e.g. a user reading the answer before the next click
            warm = [client.ok(f"/{endpoint}", request_body(endpoint, text, seq, v))[1:] for v in range(1, warm_n + 1)]
            r = res[endpoint]
            # Noise on this kind of machine drifts over seconds: each cold request is divided by
            # the mean of the HF forwards run just before and after it on the same tokens, and
            # the ratios' median kept.
            row = {"tokens": seq, "endpoint": endpoint, "hf": median(r["hf"]), "cold": median(r["cold"]),
                   "cold_hf": median([c / h for c, h in zip(r["cold"], r["hf"])]),
                   "naive": median(r["naive"]), "naive_cold": median([n / c for n, c in zip(r["naive"], r["cold"])]),
                   "warm": median([w[0] for w in warm]), "warm_wall": median([w[1] for w in warm])}
            rows.append(row)
            if endpoint == "trace":  # the same selection again is a cache hit
                again = [client.ok("/trace", request_body("trace", text, seq, 1))[1:] for _ in range(warm_n)]
                rows.append({**row, "endpoint": "trace (same selection)", "warm": median([a[0] for a in again]),
                             "warm_wall": median([a[1] for a in again])})
            if endpoint == "predict" and seq > 2 * 64:  # positions outside the prefetch window
                far = [client.ok("/predict", {"text": text, "token_index": p, "top_k": 10})[1:]
                       for p in (1, seq - 2)]
                rows.append({**row, "endpoint": "predict (not prefetched)", "warm": median([a[0] for a in far]),
                             "warm_wall": median([a[1] for a in far])})
        rows_cache = orjson.loads(client.ok("/health")[0])["cache"]
        print(f"  {seq:5d} tokens done; cache {rows_cache['bytes'] / 2**20:.0f} MiB", file=sys.stderr)

    explorer.worker.wait_idle(120)
    text32 = texts.make(32)
    client.ok("/attention", {"text": text32, "layer": 0, "head": 0})
    walls = sorted(client.ok("/attention", {"text": text32, "layer": i % 12, "head": (i * 7) % 12})[2]
                   for i in range(200 if not quick else 50))
    http = {"p50": walls[len(walls) // 2], "p99": walls[int(len(walls) * 0.99)], "n": len(walls)}

    reference = [client.ok(path, body)[0] for path, body in mixed_requests(model.tokenizer)]
    server.close()
    return rows, http, reference


def mixed_requests(tokenizer: Any) -> list[tuple[str, dict]]:
    """The concurrency workload: 4 texts of 32 tokens (none used elsewhere), every endpoint."""
    texts = Texts(tokenizer)
    texts.next_offset = 1000
    reqs: list[tuple[str, dict]] = []
    for _ in range(4):
        text = texts.make(32)
        reqs.append(("/tokenize", {"text": text}))
        reqs.append(("/trace", {"text": text}))
        reqs += [("/attention", {"text": text, "layer": l, "head": (l * 5) % 12}) for l in range(0, 12, 3)]
        reqs.append(("/attention", {"text": text, "layer": 6}))
        reqs += [("/predict", {"text": text, "token_index": p, "top_k": 5}) for p in (3, 17, 31)]
    return reqs


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def part2(reference: list[bytes], quick: bool, device: str) -> dict:
    """`python app.py --random-weights` in a subprocess: startup, memory at 1024 tokens, concurrency."""
    from explorer.runtime.loading import gpt2_tokenizer

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--random-weights", "--device", device,
                             "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}")
            try:
                candidate = Client(port)
                candidate.ok("/tokenize", {"text": "Hello"})
                client = candidate
            except (ConnectionError, OSError):
                time.sleep(0.05)
        out["startup_s"] = time.perf_counter() - start
        tokenizer = gpt2_tokenizer()
        texts = Texts(tokenizer)
        texts.next_offset = 2000

        # 8 clients on a fresh cache, each sending the whole mixed workload in its own order.
        reqs = mixed_requests(tokenizer)
        clients = [Client(port) for _ in range(8)]

        def session(c: int) -> list[tuple[int, bytes]]:
            """Client c's whole workload on its own connection; odd clients go backwards."""
            order = range(len(reqs)) if c % 2 == 0 else reversed(range(len(reqs)))
            return [(i, clients[c].ok(*reqs[i])[0]) for i in order]

        def run_all() -> tuple[list[tuple[int, bytes]], float]:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                answers = [a for answers in pool.map(session, range(8)) for a in answers]
            return answers, time.perf_counter() - t0

        answers, seconds = run_all()
        out["concurrent"] = {"requests": len(answers), "seconds": seconds,
                             "mismatches": sum(data != reference[i] for i, data in answers)}
        answers, seconds = run_all()  # all cached now: warm throughput
        out["warm_rps"] = len(answers) / seconds
        out["cache_after_mixed"] = orjson.loads(client.ok("/health")[0])["cache"]

        # Memory: serve 1024-token texts (all endpoints, every layer's all-heads attention).
        base_kb = proc_kb(proc.pid, "VmRSS")
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
        all_heads = []
        for _ in range(1 if quick else 2):
            text = texts.make(1024)
            client.ok("/tokenize", {"text": text})
            client.ok("/trace", {"text": text})
            for layer in range(12):
                data, server_ms, wall = client.ok("/attention", {"text": text, "layer": layer})
                all_heads.append((len(data), server_ms, wall))
            client.ok("/attention", {"text": text, "layer": 11, "head": 11})
            for pos in (1, 512, 1023):
                client.ok("/predict", {"text": text, "token_index": pos, "top_k": 100})
            time.sleep(1 if quick else 6)  # idle-time prefetch of nearby positions runs meanwhile
        out["rss_model_mb"] = base_kb / 1024
        out["peak_above_model_mb"] = (proc_kb(proc.pid, "VmHWM") - base_kb) / 1024
        out["cache_after_1024"] = orjson.loads(client.ok("/health")[0])["cache"]
        out["all_heads_mb"] = median([a[0] for a in all_heads]) / 2**20
        out["all_heads_server_ms"] = median([a[1] for a in all_heads])
        out["all_heads_wall_ms"] = median([a[2] for a in all_heads])
    finally:
        proc.terminate()
        proc.wait(30)
    return out


def fmt(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def report(rows: list[dict], http: dict, p2: dict, device: str) -> str:
    where = "CPU" if device == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}. "
        "Model: GPT-2-small shape (12 layers, 12 heads, d_model 768, vocab 50257), seeded random "
        f"weights, float32, {where}.",
        "",
        "Server-side times (the `Server-Timing` header: parse, cache or model, JSON), medians. "
        "HF = one plain `GPT2LMHeadModel` forward on the same tokens; naive = full `run_with_cache` "
        "plus the answer, per request. Cold: a text never seen. Warm: the same text, another "
        "layer/head (attention), position (predict) or token selection (trace), after the previous "
        "answer's idle-time prefetch finished; `trace` warm asks a new token selection each time, "
        "`trace (same selection)` repeats one, `predict (not prefetched)` asks positions outside the "
        "64 prefetched ones. Ratios to HF and naive are medians of per-text ratios (each cold request "
        "paired with the reference runs on the same tokens; HF is the mean of one forward just before "
        "and one just after it), which cancels the machine's slow drift; 9 texts per row up to 128 "
        "tokens, 5 at 1024. "
        "Warm HTTP = the client's wall time for the warm request over a keep-alive connection.",
        "",
        "| tokens | endpoint | HF fwd ms | cold ms | cold / HF | warm ms | cold / warm | naive ms | naive / cold | naive / warm | warm HTTP ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} | {r['endpoint']} | {fmt(r['hf'])} | {fmt(r['cold'])} | {r['cold_hf']:.2f} | "
            f"{r['warm']:.2f} | {r['cold'] / r['warm']:.0f}x | {fmt(r['naive'])} | {r['naive_cold']:.2f} | "
            f"{r['naive'] / r['warm']:.0f}x | {r['warm_wall']:.2f} |")
    c = p2["concurrent"]
    lines += [
        "",
        f"- HTTP round trip, `/attention` one head, warm, 32 tokens, keep-alive: p50 {http['p50']:.2f} ms, "
        f"p99 {http['p99']:.2f} ms ({http['n']} requests).",
        f"- Startup: `python app.py --random-weights` to first answered request: {p2['startup_s']:.1f} s.",
        f"- 1024-token texts (all endpoints, all-heads attention of every layer, prefetch): peak RSS "
        f"{p2['peak_above_model_mb']:.0f} MB above the loaded model ({p2['rss_model_mb']:.0f} MB); cache then "
        f"{p2['cache_after_1024']['bytes'] / 2**20:.0f} MiB in {p2['cache_after_1024']['entries']} items "
        f"(bound {p2['cache_after_1024']['max_bytes'] / 2**20:.0f} MiB).",
        f"- All heads of one layer at 1024 tokens: {p2['all_heads_mb']:.1f} MiB of JSON, "
        f"{p2['all_heads_server_ms']:.0f} ms server-side, {p2['all_heads_wall_ms']:.0f} ms through HTTP.",
        f"- 8 concurrent clients, mixed endpoints, fresh cache: {c['requests']} requests in {c['seconds']:.1f} s, "
        f"{c['mismatches']} answers differing from one client's; the same workload warm: "
        f"{p2['warm_rps']:.0f} requests/s.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="also write the report to this file")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = parser.parse_args()
    tune_allocator()  # as app.py does, so both sides of every ratio run with the server's allocator
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as model_dir:
        random_gpt2(model_dir).save_pretrained(model_dir)  # the weights --random-weights builds
        print("part 1: in-process latency ...", file=sys.stderr)
        rows, http, reference = part1(model_dir, args.quick, args.device)
    print("part 2: app.py subprocess ...", file=sys.stderr)
    text = report(rows, http, part2(reference, args.quick, args.device), args.device)
    print(text)
    if args.markdown:
        args.markdown.write_text("# Benchmark results\n\nOutput of `make bench` (`python -m bench.bench`).\n\n"
                                 + text + "\n" + OTHER_RESULTS)
    return 0


# The benchmarks of single features, each with its own script and results file beside this one.
OTHER_RESULTS = """
## Other benchmarks

Each has its own script (one run, ratios measured within it) and results file:

| what | script | results |
|---|---|---|
| generation (tokens/s against HF `generate`, streaming, memory) | `python -m bench.generate_bench` | [RESULTS-generate.md](RESULTS-generate.md) |
| long requests (admission, cancel, disconnect, memory) | `python -m bench.long_bench` | [RESULTS-long.md](RESULTS-long.md) |
| SAE features (`/features` against a forward pass, warm, memory) | `python -m bench.features_bench` | [RESULTS-features.md](RESULTS-features.md) |
| the Jacobian lens (`/lens` through a lens against the logit lens, warm, fitting) | `python -m bench.jlens_bench` | [RESULTS-jlens.md](RESULTS-jlens.md) |
| Ray Serve cluster (latency added, throughput with 1 and 2 replicas, start-up, install size) | `python -m bench.cluster_bench` | [RESULTS-cluster.md](RESULTS-cluster.md) |
| this table on an H100 | `python -m bench.bench --device cuda` | [RESULTS-h100.md](RESULTS-h100.md) |
"""


if __name__ == "__main__":
    sys.exit(main())
