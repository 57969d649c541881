"""`python -m explorer.cluster` (`make cluster`): a local Ray, a Redis and the Serve application in
one command; `build` is the application builder a `serve deploy` config names
(`import_path: explorer.cluster.cli:build`, see deploy/)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from ..runtime.engine import DEFAULT_CACHE_BYTES, DEFAULT_QUEUE_SIZE, DEFAULT_WAIT_SECONDS, DEFAULT_WORK_BYTES
from ..runtime.loading import route_library_logs
from ..web.server import add_model_arguments, is_loopback, model_config, parse_model_arguments
from .jobs import LocalRedis
from .serve import application

log = logging.getLogger("explorer")
APP_NAME = "explorer"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m explorer.cluster", allow_abbrev=False,
                                description="Serve the explorer's API from several replicas on Ray Serve.")
    add_model_arguments(p)
    p.add_argument("--replicas", type=int, default=int(env("EXPLORER_REPLICAS", "1")),
                   help="replicas of each model [EXPLORER_REPLICAS] (default 1)")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaling lower bound (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale each model between --min-replicas and this, by requests in flight "
                        "(default: a fixed --replicas)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per replica, fractions allowed (0.5: two replicas share one GPU) (default 0)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch threads per replica (default: --num-cpus, or the cores / --replicas when it is 0)")
    p.add_argument("--cache-mb", type=int, default=DEFAULT_CACHE_BYTES >> 20,
                   help="activation cache bound per replica, MiB (default %(default)s)")
    p.add_argument("--work-mb", type=int, default=DEFAULT_WORK_BYTES >> 20,
                   help="one request's working memory beside the cache, MiB (default %(default)s)")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                   help="model requests waiting per replica before it answers 503 (default %(default)s)")
    p.add_argument("--http-threads", type=int, default=8,
                   help="threads per replica serving cache hits beside the model queue (default 8)")
    p.add_argument("--max-queued", type=int, default=64,
                   help="requests waiting in Ray for a free replica before the ingress answers 503 (default 64)")
    p.add_argument("--stuck-seconds", type=float, default=DEFAULT_WAIT_SECONDS,
                   help="a replica whose model worker ran nothing this long fails its health check "
                        "and is replaced (default %(default)s)")
    p.add_argument("--host", default=env("EXPLORER_HOST", "127.0.0.1"), help="[EXPLORER_HOST] (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("EXPLORER_PORT", "5000")), help="[EXPLORER_PORT] (default 5000)")
    p.add_argument("--redis", default=env("EXPLORER_REDIS_URL"),
                   help="the jobs' Redis, redis://HOST:PORT/DB [EXPLORER_REDIS_URL] "
                        "(default: start a private redis-server on loopback)")
    p.add_argument("--address", default=env("RAY_ADDRESS"),
                   help="a running Ray cluster to join [RAY_ADDRESS] (default: start a local one)")
    args = parse_model_arguments(p, argv)
    for name in ("replicas", "min_replicas", "queue_size", "http_threads", "max_queued"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_replicas is not None and not args.min_replicas <= args.replicas <= args.max_replicas:
        p.error("autoscaling needs --min-replicas <= --replicas <= --max-replicas")
    if args.num_cpus < 0 or args.num_gpus < 0 or args.stuck_seconds <= 0:
        p.error("--num-cpus, --num-gpus must be >= 0 and --stuck-seconds > 0")
    return args


def options(args: argparse.Namespace) -> dict[str, Any]:
    """What `serve.application` takes: the deployment options and each replica's app configuration."""
    config = {**model_config(args), "CACHE_BYTES": args.cache_mb << 20, "WORK_BYTES": args.work_mb << 20,
              "QUEUE_SIZE": args.queue_size, "CHECK_HOST": is_loopback(args.host)}
    return {"model": args.model, "replicas": args.replicas, "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
            "torch_threads": args.torch_threads, "queue_size": args.queue_size, "http_threads": args.http_threads,
            "max_queued": args.max_queued, "stuck_seconds": args.stuck_seconds, "config": config}


def build(args: dict[str, Any]) -> serve.Application:
    """The application for a `serve deploy` / `serve run` config: `args` are the command line's
    flags by name (`model: [gpt2]`, `replicas: 2`, `num_gpus: 1`, ...); `redis` is required."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                argv.append(flag)
            elif item is not False and item is not None:
                argv += [flag, str(item)]
    try:
        parsed = parse_args(argv)
    except SystemExit:  # argparse printed which flag is wrong
        raise ValueError(f"invalid args {args}: see python -m explorer.cluster --help") from None
    if parsed.redis is None:
        raise ValueError("args.redis is required (redis://HOST:PORT/DB): the replicas share their jobs there")
    return application(options(parsed), parsed.redis)


def start(args: argparse.Namespace, redis_url: str) -> float:
    """Start Serve's HTTP proxy and the application on the connected Ray; seconds until it served."""
    started = time.perf_counter()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(application(options(args), redis_url), name=APP_NAME, route_prefix="/")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    route_library_logs()
    import ray

    local = None if args.redis else LocalRedis()
    stop = threading.Event()
    # A local Ray's workers inherit this environment and import the application by module name.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    try:
        ray.init(address=args.address, include_dashboard=False)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which installs its own
        seconds = start(args, args.redis or local.url)
        log.info("Serving %s (%d replica(s) each) on http://%s:%d, ready after %.1f s; jobs in %s",
                 ", ".join(args.model), args.replicas, args.host, args.port, seconds,
                 args.redis or f"a private redis-server on port {local.port}")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        if local is not None:
            local.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
