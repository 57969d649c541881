"""The Ray Serve cluster against the plain server, on GPT-2 small's shape (random weights).

    python -m bench.cluster_bench [--markdown bench/RESULTS-cluster.md] [--serve-env NAME=VALUE ...]

One run, in this order so no two servers share the cores: the plain server (`python app.py`, all
cores), then a local Ray with the application at one replica (all cores) and at two replicas
(half the cores each, `--torch-threads`). Each measures warm latency (one cached text, one client,
keep-alive: what a click costs) and new-text throughput (distinct texts from 4 clients: every
request a forward pass). Start-up: the plain server from spawn to its first answer; the cluster's
`ray.init` and each `serve.run` until ready. Serve's floor: the same client's warm latency to
trivial deployments, through the proxy alone and through the proxy, an ingress and a handle call
(the cluster's path). `--serve-env` measures Ray Serve's settings (ray/serve/_private/constants.py).
Installed size: the distributions that
requirements-cluster.txt adds beyond requirements.txt and requirements-dev.txt, in this interpreter.
Needs requirements-cluster.txt and redis-server.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import PARAGRAPH, Client, free_port  # noqa: E402

WARM_REQUESTS = 400
NEW_TEXTS = 24
CLIENTS = 4
CORES = os.cpu_count() or 1


def texts(n: int, offset: int) -> list[str]:
    """`n` distinct texts of 40 words (about 50 tokens), never sent before in this run."""
    words = (PARAGRAPH * 8).split()
    return [" ".join(words[offset + i: offset + i + 40]) for i in range(n)]


def wait_ready(port: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Client(port).call("/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port}")


def warm(port: int) -> dict[str, float]:
    """p50/p99 wall ms of a cached /predict, and the app's own time (Server-Timing) at p50."""
    client = Client(port)
    body = {"text": "The cat sat on the mat and looked at the door", "token_index": 5, "top_k": 10}
    for _ in range(20):
        client.ok("/predict", body)
    walls, apps = [], []
    for _ in range(WARM_REQUESTS):
        _, app, wall = client.ok("/predict", body)
        walls.append(wall)
        apps.append(app)
    walls.sort()
    return {"p50": statistics.median(walls), "p99": walls[int(len(walls) * 0.99) - 1], "app": statistics.median(apps)}


def throughput(port: int, batch: list[str]) -> float:
    """New texts per second: each a first /predict (a forward pass), from CLIENTS clients."""
    def one(text: str) -> None:
        Client(port).ok("/predict", {"text": text, "token_index": 3, "top_k": 10})
    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, batch))
    return len(batch) / (time.perf_counter() - started)


class Ok:
    """A Serve deployment that answers b"ok" over HTTP or to a handle: the floor under the cluster."""

    async def __call__(self, _: Any) -> Any:
        from starlette.responses import Response
        return Response(b"ok")

    async def answer(self) -> bytes:
        return b"ok"


class Relay:
    """A trivial ingress: one handle call to `Ok` per request, keyed as the cluster's ingress calls a replica."""

    def __init__(self, ok: Any) -> None:
        self.ok = ok.options(session_id="one text")

    async def __call__(self, _: Any) -> Any:
        from starlette.responses import Response
        return Response(await self.ok.answer.remote())


def floor(port: int) -> dict[str, float]:
    """p50 wall ms of a GET through Serve's proxy to a trivial deployment, and through a trivial
    ingress to a trivial deployment (the cluster's two hops, its router), measured with the same client."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from explorer.cluster.serve import CONSISTENT_HASH

    ok = serve.deployment(Ok).options(ray_actor_options={"num_cpus": 0},
                                      request_router_config=RequestRouterConfig(request_router_class=CONSISTENT_HASH))
    serve.run(ok.bind(), name="floor-1", route_prefix="/one")
    serve.run(serve.deployment(Relay).options(ray_actor_options={"num_cpus": 0}).bind(ok.bind()),
              name="floor-2", route_prefix="/two")
    result = {}
    for path in ("/one", "/two"):
        client = Client(port)
        walls = [client.call(path)[3] for _ in range(20 + WARM_REQUESTS)][20:]
        result[path] = statistics.median(walls)
    serve.delete("floor-1")
    serve.delete("floor-2")
    return result


def plain_server() -> dict[str, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--random-weights", "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": str(CORES)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port)
        result = {"start": time.perf_counter() - started, **warm(port)}
        result["texts_per_s"] = throughput(port, texts(NEW_TEXTS, 0))
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def cluster(redis_url: str, env: dict[str, str]) -> dict[int | str, dict[str, float]]:
    import ray
    from ray import serve

    from explorer.cluster.cli import APP_NAME, parse_args, start

    started = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    results: dict[int | str, dict[str, float]] = {0: {"start": time.perf_counter() - started}}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        results["floor"] = floor(port)
        for replicas in (1, 2):
            port = free_port()
            threads = max(1, CORES // replicas)
            args = parse_args(["--random-weights", "--replicas", str(replicas), "--num-cpus", str(threads),
                               "--torch-threads", str(threads), "--port", str(port), "--redis", redis_url])
            serve.shutdown()  # a fresh proxy on the new port
            results[replicas] = {"start": start(args, redis_url), **warm(port)}
            results[replicas]["texts_per_s"] = throughput(port, texts(NEW_TEXTS, NEW_TEXTS * replicas))
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def closure(names: list[str]) -> set[str]:
    """Installed distributions `names` need, themselves included (extras followed, markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(key)
        for spec in dist.requires or []:
            child = Requirement(spec)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(child)
    return seen


def requirements(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def installed_mb() -> tuple[float, int]:
    """MB on disk and count of the distributions only the cluster needs."""
    base = closure(requirements(ROOT / "requirements.txt") + requirements(ROOT / "requirements-dev.txt"))
    extra = closure(requirements(ROOT / "requirements-cluster.txt")) - base
    size = 0
    for name in extra:
        dist = metadata.distribution(name)
        size += sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or []
                    if Path(dist.locate_file(f)).is_file())
    return size / 1e6, len(extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--serve-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a Ray Serve setting for every Ray process (ray.init's runtime_env), e.g. "
                        "RAY_SERVE_USE_GRPC_BY_DEFAULT=1; repeatable")
    args = p.parse_args()
    env = dict(item.split("=", 1) for item in args.serve_env)
    from explorer.cluster.jobs import LocalRedis

    size, count = installed_mb()
    plain = plain_server()
    redis = LocalRedis()
    try:
        ray_results = cluster(redis.url, env)
    finally:
        redis.stop()
    one, two, low = ray_results[1], ray_results[2], ray_results["floor"]
    settings = " ".join(f"`{k}={v}`" for k, v in env.items()) or "none"
    lines = [
        f"Ray Serve cluster vs plain server, GPT-2 small (random weights), CPU ({platform.machine()}, "
        f"{CORES} cores), one run of `python -m bench.cluster_bench`; Serve settings: {settings}; "
        f"load average {os.getloadavg()[0]:.1f} at the end (`uptime`).",
        "",
        "| setup | start-up s | warm p50 ms | warm p99 ms | app ms (p50) | new texts/s, 4 clients |",
        "|---|---|---|---|---|---|",
        f"| plain server (`python app.py`, {CORES} threads) | {plain['start']:.1f} (spawn to first answer) | "
        f"{plain['p50']:.2f} | {plain['p99']:.2f} | {plain['app']:.2f} | {plain['texts_per_s']:.2f} |",
        f"| cluster, 1 replica ({CORES} threads) | {one['start']:.1f} (`serve.run`; `ray.init` "
        f"{ray_results[0]['start']:.1f}) | {one['p50']:.2f} | {one['p99']:.2f} | {one['app']:.2f} | "
        f"{one['texts_per_s']:.2f} |",
        f"| cluster, 2 replicas ({max(1, CORES // 2)} thread(s) each) | {two['start']:.1f} (`serve.run`) | "
        f"{two['p50']:.2f} | {two['p99']:.2f} | {two['app']:.2f} | {two['texts_per_s']:.2f} |",
        "",
        f"Added by Serve at p50 (1 replica - plain): {one['p50'] - plain['p50']:+.2f} ms "
        f"(goal: at most +2 ms); at p99: {one['p99'] - plain['p99']:+.2f} ms.",
        f"Serve's floor, same client, trivial deployments answering b\"ok\": p50 {low['/one']:.2f} ms through the "
        f"proxy to one deployment, {low['/two']:.2f} ms through the proxy, an ingress and a handle call (the "
        f"cluster's path; its router).",
        f"New-text throughput, 2 replicas / 1 replica: {two['texts_per_s'] / one['texts_per_s']:.2f}x; "
        f"1 replica / plain server: {one['texts_per_s'] / plain['texts_per_s']:.2f}x.",
        f"Installed beyond requirements.txt + requirements-dev.txt: {count} distributions, {size:.0f} MB.",
    ]
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
