"""One route per registered operation: parse the body, call the operation, answer JSON. A long
operation's steps run synchronously (200, stopping if the client leaves) or, with
`"async": true`, as a job (202 with its id)."""
from __future__ import annotations

from typing import Callable, Iterator

import orjson
from flask import Blueprint, Response, current_app, request

from ..errors import InvalidRequest
from ..operations import OPERATIONS, Operation, parse
from ..operations.base import StreamRequest
from ..runtime.jobs import Stream, run_sync, stamped
from .common import job_manager, json_response, models, request_json

bp = Blueprint("operations", __name__)


def _client_gone() -> Callable[[], bool]:
    """Whether the client of this request has disconnected (waitress tells when it reads ahead
    of a running request, `channel_request_lookahead`; other servers: never)."""
    return request.environ.get("waitress.client_disconnected") or (lambda: False)


def check_size(estimate: int) -> None:
    """Refuse before building a response of about `estimate` bytes over MAX_RESPONSE_BYTES."""
    limit = current_app.config["MAX_RESPONSE_BYTES"]
    if estimate > limit:
        raise InvalidRequest(
            f"the response would be about {estimate >> 20} MiB, over the server's limit of "
            f"{limit >> 20} MiB; ask for one head or a shorter text")


def _event_stream(stream: Stream) -> Iterator[bytes]:
    """Server-sent events: `event: <kind>` and one line of JSON per event."""
    for kind, data in stream.events():
        payload = {"error": data} if kind == "error" else data
        data_line = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
        yield b"event: " + kind.encode() + b"\ndata: " + data_line + b"\n\n"


def _view(op: Operation) -> Callable[[], Response]:
    def view() -> Response:
        body = request_json()
        req = parse(op.request, body)
        ex = models().get(req.model)
        if op.response_bytes is not None:
            check_size(op.response_bytes(ex, req))
        streamed = isinstance(req, StreamRequest) and req.stream
        if streamed and req.run_async:
            raise InvalidRequest("stream and async exclude each other: stream the answer, or poll a job")
        result = op.run(ex, req)
        if op.mode == "job" or (op.mode == "steps" and req.run_async):  # a job's result always says where from
            job = job_manager().start(op.kind, stamped(result, lambda: op.stamp(ex, body, req)), ex.worker)
            return json_response({"job": job.id}, 202, {"Location": f"/jobs/{job.id}"})
        if streamed:
            if req.provenance:
                result = stamped(result, lambda: op.stamp(ex, body, req))
            stream = Stream(op.kind, result, ex.worker, _client_gone())
            return Response(_event_stream(stream), mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if op.mode == "steps":
            result = run_sync(op.kind, result, ex.worker, _client_gone())
        return json_response({**result, "provenance": op.stamp(ex, body, req)} if req.provenance else result)
    view.__name__ = op.kind
    return view


for _op in OPERATIONS.values():
    bp.add_url_rule(_op.path, view_func=_view(_op), methods=["POST"])
