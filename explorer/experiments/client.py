"""One request to the API, in-process (the app's test client: the server's own code, no socket) or
to a running server (HTTP), with a long operation run as a job whose progress is reported."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from flask import Flask

from ..operations import OPERATIONS

POLL_SECONDS = 0.1
TRANSPORT_KEYS = ("provenance", "async")  # how a request is sent, not what it asks: not part of a record


class Client(Protocol):
    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body)."""


class InProcess:
    """The server's app, called without a socket."""

    def __init__(self, app: Flask) -> None:
        self._client = app.test_client()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        response = self._client.open(path, method=method, json=body)
        return response.status_code, response.get_json(silent=True)


class Remote:
    """A running server at `base` (e.g. http://127.0.0.1:5001)."""

    def __init__(self, base: str, timeout: float = 600.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.load(exc)
            except ValueError:
                return exc.code, {"error": f"HTTP {exc.code} {exc.reason}"}


@dataclass
class Outcome:
    """What one request gave: the answer (without its provenance) and the provenance, or the
    error status and message."""

    response: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    status: int = 200
    error: str | None = None
    seconds: float = 0.0


def content(body: dict[str, Any]) -> dict[str, Any]:
    """A request body without its transport fields (`provenance`, `async`)."""
    return {k: v for k, v in body.items() if k not in TRANSPORT_KEYS}


def execute(client: Client, endpoint: str, body: dict[str, Any],
            progress: Callable[[float], None] = lambda _: None) -> Outcome:
    """Send `body` to `endpoint` asking for its provenance. A long operation runs as a job (its
    own time bound, progress reported between polls), so a request that runs synchronously over
    HTTP gets the same answer here."""
    start = time.perf_counter()
    op = OPERATIONS.get(endpoint)
    if op is None:
        return Outcome(status=404, error=f"no endpoint {endpoint}; endpoints: {', '.join(OPERATIONS)}")
    sent = {**content(body), "provenance": True, **({"async": True} if op.mode == "steps" else {})}
    status, data = client.call("POST", endpoint, sent)
    if status == 202:
        job = data["job"]
        while True:
            status, data = client.call("GET", f"/jobs/{job}")
            if status != 200 or data["status"] in ("done", "error", "cancelled"):
                break
            progress(float(data.get("progress", 0.0)))
            time.sleep(POLL_SECONDS)
        if status == 200 and data["status"] == "done":
            status, data = 200, data["result"]
        elif status == 200:
            status, data = 400, {"error": data.get("error") or data["status"]}
    seconds = time.perf_counter() - start
    if status != 200 or not isinstance(data, dict):
        message = data.get("error") if isinstance(data, dict) else None
        return Outcome(status=status, error=message or f"HTTP {status}", seconds=seconds)
    progress(1.0)
    data = dict(data)
    return Outcome(response=data, provenance=data.pop("provenance", None), seconds=seconds)
