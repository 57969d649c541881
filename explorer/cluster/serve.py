"""The Ray Serve application: an ingress (`ingress.Router`) and one deployment per model
(`ModelServer`, this module: it imports torch and the server, which the ingress never loads).

The ingress reads each request's body, picks the model's deployment and a routing key
(`forward.route`: model + text, token ids, clean prompt, prompt or text list), and calls the
deployment through a handle with `session_id=key`; the deployment's consistent-hash router
(`ray.serve.experimental.consistent_hash_router`, experimental in Ray 2.60) sends every request
with that key to one replica, whose cache then holds the text. Each replica is the single
server's Flask app (built inside the replica: a Flask app does not pickle), called as WSGI on a
thread pool, so the HTTP API is the single server's, plus an `X-Replica` header naming the replica
that answered. Jobs live in Redis (`jobs.SharedJobs`), so any replica answers `GET /jobs/{id}`.
"""
from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import redis
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..runtime.engine import DEFAULT_WAIT_SECONDS, ModelWorker
from ..runtime.saes import for_model
from ..web.server import create_app, load_configured
from .forward import REPLICA_HEADER, Request, call_wsgi
from .ingress import Router
from .jobs import SharedJobs

CONSISTENT_HASH = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
HEALTH_CHECK_SECONDS = 5.0


class Probe:
    """Whether a model worker still takes work (a replica's health check): a no-op queued behind the
    requests waiting must have run within `stuck_seconds` (the wait after which a request is answered
    503, `engine.DEFAULT_WAIT_SECONDS`). A worker stuck in one call never runs it: unhealthy, and Ray
    Serve replaces the replica. A chunked long request is not stuck: the probe runs between chunks.

    The bound (Ray 2.60): Serve checks every HEALTH_CHECK_SECONDS (jittered +-10%); the probe is
    queued at the first check after the worker stalled, the first check more than `stuck_seconds`
    later fails, and Serve marks the replica unhealthy after 3 failures in a row
    (`REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD`): within `stuck_seconds` + 4 periods (+22 s) of the
    stall. It then starts a replacement (a replica's start-up) and gives the old one
    `graceful_shutdown_timeout_s` (20 s) before killing it. Measured in tests/test_cluster.py with
    `stuck_seconds` 3 and the tiny model, six runs: unhealthy (stopped) after 18.9-20.0 s, the new
    replica answered after 31.9-42.1 s."""

    def __init__(self, worker: ModelWorker, stuck_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        self.worker = worker
        self.stuck_seconds = stuck_seconds
        self._pending: Future[None] | None = None
        self._since = 0.0

    def check(self) -> None:
        """Raise RuntimeError when the worker is stuck; otherwise queue the next probe."""
        if self._pending is None or self._pending.done():
            self._pending = self.worker.submit(lambda: None, bounded=False)
            self._since = time.monotonic()
            return
        waited = time.monotonic() - self._since
        if waited > self.stuck_seconds:
            raise RuntimeError(f"the model worker ran nothing for {waited:.0f} s "
                               f"(bound {self.stuck_seconds:.0f} s): stuck")


class ModelServer:
    """One replica: one model behind the single server's Flask app."""

    def __init__(self, config: dict[str, Any], redis_url: str, torch_threads: int, http_threads: int,
                 stuck_seconds: float) -> None:
        torch.set_num_threads(torch_threads)  # N replicas on one machine share its cores
        config = dict(config)  # load_configured replaces its --sae specs by the loaded SAEs, which create_app attaches
        models = load_configured(config)
        if models is None:
            raise RuntimeError(f"could not load {config['MODEL']} (the reason is in this replica's log)")
        self.app = create_app(config, model=models)
        explorer = self.app.extensions["explorer"]
        explorer.vocab_strs  # decoded now, not on the first /predict
        context = serve.get_replica_context()
        self.replica = f"{context.deployment}#{context.replica_id.unique_id}"
        self.jobs = SharedJobs(redis.Redis.from_url(redis_url), self.replica, {"model": explorer.model.name})
        self.app.extensions["jobs"] = self.jobs
        self.pool = ThreadPoolExecutor(http_threads, thread_name_prefix="http")
        self.probe = Probe(explorer.worker, stuck_seconds)

    async def answer(self, req: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        """The app's answer to `req`. Serve cancels this call when the HTTP client disconnects (the
        proxy cancels the ingress's request, and Serve the ingress's calls to this deployment); the
        app's thread cannot be cancelled, so it is told, and its long work stops before its next
        chunk (a 499 nobody reads)."""
        left = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._answer, req, left.is_set)
        except asyncio.CancelledError:
            left.set()
            raise

    def _answer(self, req: Request, gone: Callable[[], bool]) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, body = call_wsgi(self.app, req, gone)
        try:
            data = b"".join(body)
        finally:
            getattr(body, "close", lambda: None)()
        return status, headers + [(REPLICA_HEADER, self.replica)], data

    async def answer_stream(self, req: Request) -> AsyncIterator[Any]:
        """Server-sent events: first (status, headers), then the body's chunks as they come.
        Closing the body (the client left: Serve cancels this generator) cancels the work."""
        loop = asyncio.get_running_loop()
        status, headers, body = await loop.run_in_executor(self.pool, call_wsgi, self.app, req)
        chunks = iter(body)
        try:
            yield status, headers + [(REPLICA_HEADER, self.replica)]
            while (chunk := await loop.run_in_executor(self.pool, next, chunks, None)) is not None:
                yield chunk
        finally:
            getattr(body, "close", lambda: None)()

    def check_health(self) -> None:
        self.probe.check()

    def __del__(self) -> None:  # Serve's graceful shutdown: end this replica's jobs now
        if hasattr(self, "jobs"):
            self.jobs.close()


def deployment_name(model: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def application(options: dict[str, Any], redis_url: str) -> serve.Application:
    """The Serve application for `options` (`cli.options`: the command line's flags)."""
    replicas = options["replicas"]
    if options["max_replicas"] is not None:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": options["min_replicas"], "max_replicas": options["max_replicas"],
            "initial_replicas": replicas, "target_ongoing_requests": options["queue_size"] // 2}}
    else:
        scaling = {"num_replicas": replicas}
    torch_threads = options["torch_threads"] or max(1, int(options["num_cpus"]) or (os.cpu_count() or 1) // replicas)
    deployments = {}
    for i, name in enumerate(options["model"]):
        # The single server's configuration of this one model: its random-weights seed (model i:
        # seed i) and the SAEs given for it (model=NAME, or none named for the default, first model).
        config = {**options["config"], "MODEL": [name], "FIRST_SEED": i,
                  "SAES": for_model(options["config"]["SAES"], name, default=i == 0)}
        deployments[name] = serve.deployment(ModelServer).options(
            name=deployment_name(name),
            ray_actor_options={"num_cpus": options["num_cpus"], "num_gpus": options["num_gpus"]},
            # A replica takes what the single server takes at once (its HTTP threads serve cache hits
            # while its model queue holds waiting work); past that the router tries the next replica.
            max_ongoing_requests=options["queue_size"] + options["http_threads"],
            max_queued_requests=options["max_queued"],
            health_check_period_s=HEALTH_CHECK_SECONDS,
            health_check_timeout_s=HEALTH_CHECK_SECONDS * 6,
            request_router_config=RequestRouterConfig(request_router_class=CONSISTENT_HASH),
            **scaling,
        ).bind(config, redis_url, torch_threads, options["queue_size"] + options["http_threads"],
               options["stuck_seconds"])
    return serve.deployment(Router).options(
        name="router", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
    ).bind(deployments)
