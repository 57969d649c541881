"""What every blueprint shares: JSON in and out, the model a request names, jobs."""
from __future__ import annotations

from typing import Any, Iterator

import orjson
from flask import Response, current_app, request

from .. import schemas
from ..analysis import InvalidRequest
from ..jobs import JobManager
from ..service import Explorer, Models


class UnsupportedType(Exception):
    """The request body is not declared as JSON (415)."""


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def request_json() -> Any:
    """The body as strict JSON (no NaN/Infinity, no lone surrogates); 415 if it is not JSON."""
    if request.mimetype != "application/json":
        raise UnsupportedType()
    try:
        return orjson.loads(request.get_data(cache=False))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc})") from None


def models() -> Models:
    return current_app.extensions["models"]


def parse(model: type[schemas.Request]) -> tuple[Any, Explorer]:
    """The validated request body and the explorer of the model it names (default: the first)."""
    req = schemas.parse(model, request_json())
    return req, models().get(req.model)


def job_manager() -> JobManager:
    return current_app.extensions["jobs"]


def run_job(kind: str, steps: Iterator[Any], ex: Explorer, run_async: bool) -> Response:
    """A long computation: its result (200), or with `"async": true` its job id (202) at once."""
    if run_async:
        job = job_manager().start(kind, steps, ex.worker)
        return json_response({"job": job.id}, 202, {"Location": f"/jobs/{job.id}"})
    return json_response(job_manager().run(kind, steps, ex.worker))
