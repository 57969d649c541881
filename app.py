"""Flask JSON API over a language model's internals. `python app.py --help` for options."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from explorer.runtime.engine import DEFAULT_CACHE_BYTES, DEFAULT_WORK_BYTES, tune_allocator
from explorer.runtime.loading import ModelLoadError, route_library_logs
from explorer.web.server import (DEFAULTS, add_model_arguments, create_app, is_loopback, load_configured,
                                 model_config, parse_model_arguments)

__all__ = ["DEFAULTS", "create_app", "is_loopback", "main", "parse_args"]
log = logging.getLogger("explorer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Serve a language model's internals as a JSON API. "
                                "Every flag has an environment-variable twin (shown in brackets).")
    add_model_arguments(p)
    p.add_argument("--host", default=env("EXPLORER_HOST", "127.0.0.1"), help="[EXPLORER_HOST] (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(env("EXPLORER_PORT", "5001")), help="[EXPLORER_PORT] (default 5001)")
    p.add_argument("--cors-origins", default=env("EXPLORER_CORS_ORIGINS"),
                   help="comma-separated allowed origins ('*' for any) [EXPLORER_CORS_ORIGINS] "
                        "(default: localhost/127.0.0.1 pages on any port and file:// pages)")
    p.add_argument("--cache-mb", type=int, default=int(env("EXPLORER_CACHE_MB", str(DEFAULT_CACHE_BYTES >> 20))),
                   help="activation cache bound in MiB [EXPLORER_CACHE_MB] (default %(default)s)")
    p.add_argument("--work-mb", type=int, default=int(env("EXPLORER_WORK_MB", str(DEFAULT_WORK_BYTES >> 20))),
                   help="working memory one request may use at once beside the cache, in MiB; long requests "
                        "are chunked to it and refused past it [EXPLORER_WORK_MB] (default %(default)s)")
    p.add_argument("--threads", type=int, default=int(env("EXPLORER_THREADS", "8")),
                   help="HTTP worker threads [EXPLORER_THREADS] (default 8)")
    return parse_model_arguments(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    route_library_logs()
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if tune_allocator():
        log.info("glibc allocator set to keep freed memory for reuse (faster forward passes)")
    loopback = is_loopback(args.host)
    if not loopback:
        log.warning("Binding to %s: anyone who can reach this address can use the API. "
                    "Use the default --host 127.0.0.1 unless you mean to share it.", args.host)
    config = {**model_config(args), "CACHE_BYTES": args.cache_mb << 20, "WORK_BYTES": args.work_mb << 20,
              "CHECK_HOST": loopback}
    models = load_configured(config)
    if models is None:
        return 1
    if args.cors_origins:
        config["CORS_ORIGINS"] = [o.strip() for o in args.cors_origins.split(",") if o.strip()]
    try:
        app = create_app(config, model=models)
    except ModelLoadError as exc:  # an SAE that does not fit its model
        print(f"\nerror: {exc}\n", file=sys.stderr)
        return 1
    for ex in app.extensions["models"].by_name.values():
        ex.vocab_strs  # decode the vocabularies now, not on the first /predict
    from waitress import serve
    log.info("Ready %.1f s after start", time.perf_counter() - START)
    # Lookahead keeps reading a connection while its request runs, so a synchronous sweep sees its
    # client leave (`waitress.client_disconnected`) and stops between chunks.
    serve(app, host=args.host, port=args.port, threads=args.threads, ident="explorer", channel_request_lookahead=4)
    return 0


START = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
