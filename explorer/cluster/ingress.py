"""The cluster's ingress: one HTTP request -> the right model deployment, with its text's routing
key (`forward.route`), through a handle whose consistent-hash router sends every request with
that key to one replica. It imports neither torch nor the server: a light process on every node."""
from __future__ import annotations

import asyncio
import logging

import orjson
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse

from .forward import FORWARDED_HEADERS, Request, route

log = logging.getLogger("explorer")

RETRY_AFTER = "2"  # seconds, when no replica can take a request (Ray's queue full, a replica just died)


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

