"""A tiny reverse proxy in front of several explorer replicas: `python scripts/route.py --port 5000
http://127.0.0.1:5001 http://127.0.0.1:5002`.

Each POST goes to the replica that rendezvous hashing picks for its text (and model), so every
request about one text reaches the same replica and hits that replica's activation cache;
adding or losing a replica moves only the texts that hashed to it. A replica that does not
answer is skipped for the next one in the text's order. Job polls (`/jobs/{id}`) go to the
replica that knows the job; other GETs (model info, the viewer) to any replica. Standard library
only; it forwards bodies as they are and adds an `X-Replica` header naming the replica used.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence
from urllib.parse import urlsplit

# Fields that name the text a request is about, in order of preference.
TEXT_FIELDS = ("text", "clean", "texts")
FORWARD_REQUEST = ("Content-Type", "Origin", "Accept")
TIMEOUT_SECONDS = 300


def route_key(body: bytes) -> str:
    """What a request is about: its model and text (the raw body when it names no text)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")
    if not isinstance(data, dict):
        return body.decode("utf-8", "replace")
    text = next((data[f] for f in TEXT_FIELDS if f in data), body.decode("utf-8", "replace"))
    return json.dumps([data.get("model"), text])


def ranked(replicas: Sequence[str], key: str) -> list[str]:
    """Replicas in rendezvous (highest random weight) order for `key`: the first one owns it."""
    def weight(replica: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{replica}\0{key}".encode()).digest()[:8], "big")
    return sorted(replicas, key=weight, reverse=True)


def forward(replica: str, method: str, path: str, headers: dict[str, str],
            body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
    url = urlsplit(replica)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=TIMEOUT_SECONDS)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def make_handler(replicas: Sequence[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {h: self.headers[h] for h in FORWARD_REQUEST if self.headers.get(h)}
            headers["Host"] = "127.0.0.1"  # replicas bound to loopback check it
            jobs = self.path.startswith("/jobs/") and self.command in ("GET", "DELETE")
            order = ranked(replicas, self.path if body is None else route_key(body))
            answer = None
            for replica in order:
                try:
                    answer = forward(replica, self.command, self.path, headers, body)
                except OSError:
                    continue  # down: the text's next replica takes it
                if not (jobs and answer[0] == 404):
                    break  # a job lives on one replica: ask the others until one knows it
            if answer is None:
                self._send(502, [("Content-Type", "application/json")],
                           json.dumps({"error": "no replica answered"}).encode(), "")
                return
            self._send(*answer, replica)

        def _send(self, status: int, headers: list[tuple[str, str]], data: bytes, replica: str) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Replica", replica)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = do_OPTIONS = _proxy

        def log_message(self, format: str, *args: object) -> None:  # quiet: one line per request is noise
            pass

    return Handler


def serve(replicas: Sequence[str], host: str = "127.0.0.1", port: int = 5000) -> ThreadingHTTPServer:
    """The proxy server (not started: call `serve_forever()`)."""
    return ThreadingHTTPServer((host, port), make_handler(list(replicas)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("replicas", nargs="+", help="replica base URLs, e.g. http://127.0.0.1:5001")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    server = serve(args.replicas, args.host, args.port)
    print(f"routing http://{args.host}:{args.port} to {', '.join(args.replicas)}", file=sys.stderr)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
