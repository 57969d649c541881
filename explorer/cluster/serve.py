"""The Ray Serve application: an ingress (`Router`) and one deployment per model (`ModelServer`).

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
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

import orjson
import redis
import torch
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse

from ..web.server import create_app, load_configured
from .forward import FORWARDED_HEADERS, REPLICA_HEADER, Probe, Request, call_wsgi, route
from .jobs import SharedJobs

log = logging.getLogger("explorer")

CONSISTENT_HASH = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"
HEALTH_CHECK_SECONDS = 5.0
RETRY_AFTER = "2"  # seconds, when no replica can take a request (Ray's queue full, a replica just died)


class ModelServer:
    """One replica: one model behind the single server's Flask app."""

    def __init__(self, config: dict[str, Any], redis_url: str, torch_threads: int, http_threads: int,
                 stuck_seconds: float) -> None:
        torch.set_num_threads(torch_threads)  # N replicas on one machine share its cores
        models = load_configured(dict(config))
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
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._answer, req)

    def _answer(self, req: Request) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, body = call_wsgi(self.app, req)
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


class Router:
    """The ingress: one HTTP request -> the right model deployment, with its text's routing key."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self.models = models
        self.names = list(models)

    async def __call__(self, http: HttpRequest) -> Response:
        body = await http.body()
        plan = route(http.method, http.url.path, body, http.query_params.get("model"), self.names)
        if plan.error is not None:
            return error(plan.error, 400)
        req = Request(http.method, http.url.path, http.url.query,
                      [(k, v) for k, v in http.headers.items() if k in FORWARDED_HEADERS], body)
        handle = self.models[plan.model]
        if plan.key is not None:
            handle = handle.options(session_id=plan.key)
        try:
            if plan.stream:
                chunks = handle.options(stream=True).answer_stream.remote(req)
                status, headers = await chunks.__anext__()
                return StreamingResponse(chunks, status_code=status, headers=dict(headers))
            if http.url.path == "/models" and len(self.names) > 1:
                return await self._models(req)
            status, headers, data = await handle.answer.remote(req)
        except BackPressureError as exc:
            return error(f"server busy: every replica of {plan.model!r} has its queue full ({exc}); "
                         "retry shortly", 503, {"Retry-After": RETRY_AFTER})
        except RayError as exc:  # the replica died under the request (a kill, a failed health check)
            log.warning("%s %s: %s", http.method, http.url.path, exc)
            return error("server busy: the replica serving this request stopped; retry shortly", 503,
                         {"Retry-After": RETRY_AFTER})
        return Response(data, status_code=status, headers=dict(headers))

    async def _models(self, req: Request) -> Response:
        """`GET /models` of several deployments: each one's `/model`, the first the default."""
        one = req._replace(path="/model", query="")
        answers = await asyncio.gather(*(h.answer.remote(one) for h in self.models.values()))
        bad = next((a for a in answers if a[0] != 200), None)
        if bad is not None:
            return Response(bad[2], status_code=bad[0], headers=dict(bad[1]))
        return Response(orjson.dumps({"default": self.names[0], "models": [orjson.loads(a[2]) for a in answers]}),
                        media_type="application/json")


def error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, headers=headers,
                    media_type="application/json")


def deployment_name(model: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def application(options: dict[str, Any], redis_url: str) -> serve.Application:
    """The Serve application for `options` (the command line's, `__main__.parse_args`)."""
    replicas = options["replicas"]
    if options["max_replicas"] is not None:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": options["min_replicas"], "max_replicas": options["max_replicas"],
            "initial_replicas": replicas, "target_ongoing_requests": options["queue_size"] // 2}}
    else:
        scaling = {"num_replicas": replicas}
    torch_threads = options["torch_threads"] or max(1, int(options["num_cpus"]) or (os.cpu_count() or 1) // replicas)
    deployments = {}
    for name in options["model"]:
        config = {**options["config"], "MODEL": [name]}
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
