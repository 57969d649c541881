"""What the cluster's ingress and replicas share, without Ray or torch (the ingress imports only
this): which model deployment and routing key a request gets, and the Flask app called as WSGI
inside a replica."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Sequence

import orjson
from werkzeug.test import EnvironBuilder, run_wsgi_app

if TYPE_CHECKING:
    from flask import Flask

# The fields that name what a request is about, first present wins: its text (or ids), the clean
# prompt of a two-prompt request, a generation's prompt, a list of texts.
TEXT_FIELDS = ("text", "token_ids", "clean", "clean_ids", "prompt", "prompt_ids", "texts")
# Request headers a replica sees (the rest are the proxy's business).
FORWARDED_HEADERS = ("content-type", "origin", "accept", "host", "access-control-request-method",
                     "access-control-request-headers")
REPLICA_HEADER = "X-Replica"


class Request(NamedTuple):
    """An HTTP request as the ingress hands it to a model replica."""
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes


class Route(NamedTuple):
    model: str  # the deployment's model
    key: str | None  # the consistent-hash key (None: any replica)
    stream: bool  # server-sent events: forwarded chunk by chunk
    error: str | None = None  # a 400 the ingress answers itself


def route(method: str, path: str, body: bytes, query_model: str | None, models: Sequence[str]) -> Route:
    """Where a request goes. A POST about a text goes to the replica that owns its model and text,
    so every click about that text reads one cache; a job's poll or cancel is keyed by its id (any
    replica answers it: the state is in Redis); other GETs go to any replica of the default model,
    or of `?model=`."""
    default = models[0]
    if method == "POST":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):  # the replica answers 400 or 415 for it
            return Route(default, None, False)
        model = data.get("model")
        if not isinstance(model, str):  # none: the default; not a string: the replica's 400 names the field
            model = default
        elif model not in models:
            return Route(default, None, False, unknown_model(model, models))
        about = next((data[f] for f in TEXT_FIELDS if f in data), data)
        digest = hashlib.sha256(orjson.dumps([model, about], option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        return Route(model, digest, data.get("stream") is True)
    if path.startswith("/jobs/"):
        return Route(default, path, False)
    if query_model is not None and query_model not in models:
        return Route(default, None, False, unknown_model(query_model, models))
    return Route(query_model or default, None, False)


def unknown_model(name: object, models: Sequence[str]) -> str:
    return f"model {name!r} is not loaded; loaded models: {', '.join(map(repr, models))}"


def call_wsgi(app: "Flask", req: Request, gone: Callable[[], bool] | None = None
              ) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:
    """Run `app` on `req` in this thread: (status, headers, body iterable; close it when done).
    `gone()` says whether the client left; the app reads it where it reads waitress's, so a
    synchronous long request stops before its next chunk, as in the single server."""
    environ = EnvironBuilder(path=req.path, method=req.method, query_string=req.query,
                             headers=req.headers, data=req.body).get_environ()
    if gone is not None:
        environ["waitress.client_disconnected"] = gone
    body, status, headers = run_wsgi_app(app, environ)
    return int(status.split(" ", 1)[0]), list(headers.items()), body
