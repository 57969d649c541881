"""What every route shares: JSON in and out, the loaded models, the jobs."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Response, current_app, request

from ..errors import InvalidRequest
from ..runtime.jobs import JobManager
from ..session import Models


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


def job_manager() -> JobManager:
    return current_app.extensions["jobs"]
