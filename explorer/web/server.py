"""The Flask app: configuration defaults, model loading from the configuration, error handlers,
CORS and the routes (`create_app`). `app.py` serves it; `python -m explorer` runs experiments
through it in-process."""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from .. import web
from ..errors import Cancelled, InvalidRequest, Overloaded
from ..runtime import jlens
from ..runtime.engine import DEFAULT_CACHE_BYTES, DEFAULT_QUEUE_SIZE, DEFAULT_WORK_BYTES, CacheBudget
from ..runtime.jobs import JobManager
from ..runtime.loading import (DEVICE_MAPS, LoadedModel, ModelLoadError, load_model, parse_max_memory,
                               resolve_device)
from ..runtime.saes import SAE, load_sae
from ..session import Explorer, Models
from . import openapi
from .common import UnsupportedType, error

log = logging.getLogger("explorer")
STATIC = Path(__file__).resolve().parents[2] / "static"  # the viewer

# localhost pages on any port, and file:// pages (which send `Origin: null`)
DEFAULT_CORS_ORIGINS = [r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$", "null"]
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}

DEFAULTS: dict[str, Any] = {
    "MODEL": "gpt2",  # a name, a comma-separated list, or a list: several models, the first the default
    "RANDOM_WEIGHTS": False,
    "DEVICE": "auto",
    "DTYPE": "float32",
    "DEVICE_MAP": None,  # "auto" | "balanced" | "sequential" | {module: device}: Accelerate placement
    "MAX_MEMORY": None,  # {0: "20GiB", "cpu": "64GiB"}
    "OFFLOAD_DIR": None,
    "CORS_ORIGINS": DEFAULT_CORS_ORIGINS,
    "MAX_CONTENT_LENGTH": 1 << 20,  # request bodies; larger ones get 413 before parsing
    "MAX_RESPONSE_BYTES": 100 << 20,
    "CACHE_BYTES": DEFAULT_CACHE_BYTES,
    "WORK_BYTES": DEFAULT_WORK_BYTES,  # one request's working memory at once, beside the cache
    "QUEUE_SIZE": DEFAULT_QUEUE_SIZE,
    "CHECK_HOST": True,  # reject non-loopback Host headers (DNS rebinding); off for public binds
    "FIRST_SEED": 0,  # --random-weights: model i gets seed FIRST_SEED + i (a cluster deployment: its model's index)
    "SAES": [],  # --sae values (runtime.saes.Spec strings) or loaded `SAE`s, attached to their models
    "JLENS": [],  # --jlens specs, "[MODEL=]SPEC": Jacobian lenses loaded with the models
    "JLENS_DIR": jlens.DEFAULT_DIR,  # where POST /jobs/jlens_fit saves lenses
}


def host_name(host: str) -> str:
    """`host[:port]` of a Host header -> host, keeping IPv6 brackets."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def is_loopback(host: str) -> bool:
    """Whether a bind address is loopback-only (then non-loopback Host headers are refused)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_names(spec: str | Sequence[str]) -> list[str]:
    """`--model` values (repeated, or comma-separated as in EXPLORER_MODEL) -> names, in order."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    return [name.strip() for part in parts for name in part.split(",") if name.strip()]


def load_models(names: Sequence[str], config: dict[str, Any]) -> list[LoadedModel]:
    """Load every model `config` names; with random weights, model i gets seed FIRST_SEED + i."""
    first = config.get("FIRST_SEED", 0)
    return [load_model(name, random_weights=config["RANDOM_WEIGHTS"], seed=first + i, device=config["DEVICE"],
                       dtype=config["DTYPE"], device_map=config["DEVICE_MAP"], max_memory=config["MAX_MEMORY"],
                       offload_dir=config["OFFLOAD_DIR"])
            for i, name in enumerate(names)]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose and place the models (the server's and the experiment runner's)."""
    env = os.environ.get
    p.add_argument("--model", action="append", type=str,
                   help="Hugging Face model name or save_pretrained directory; repeat it to serve several "
                        "models (the first is the default; requests pick one with \"model\") "
                        "[EXPLORER_MODEL, comma-separated] (default gpt2)")
    p.add_argument("--random-weights", action="store_true",
                   default=env("EXPLORER_RANDOM_WEIGHTS", "").lower() in {"1", "true", "yes"},
                   help="GPT-2-small shape with seeded random weights (model i: seed i) and the real GPT-2 "
                        "tokenizer; needs no download [EXPLORER_RANDOM_WEIGHTS=1]")
    p.add_argument("--device", default=env("EXPLORER_DEVICE", "auto"),
                   help="cpu, cuda, cuda:N or auto [EXPLORER_DEVICE] (default auto)")
    p.add_argument("--device-map", default=env("EXPLORER_DEVICE_MAP"), choices=DEVICE_MAPS,
                   help="spread a model too large for one device over GPUs, CPU memory and disk "
                        "(Accelerate; replaces --device) [EXPLORER_DEVICE_MAP]")
    p.add_argument("--max-memory", default=env("EXPLORER_MAX_MEMORY"),
                   help="per-device budget for --device-map, e.g. 0=20GiB,1=20GiB,cpu=64GiB [EXPLORER_MAX_MEMORY]")
    p.add_argument("--offload-dir", default=env("EXPLORER_OFFLOAD_DIR"),
                   help="directory for weights --device-map offloads to disk [EXPLORER_OFFLOAD_DIR]")
    p.add_argument("--dtype", default=env("EXPLORER_DTYPE", "float32"),
                   choices=["float32", "bfloat16", "float16"], help="[EXPLORER_DTYPE] (default float32)")
    p.add_argument("--sae", action="append", default=None,
                   help="a sparse autoencoder to read features with: [name=N,][model=M,][hook=H,]LOCATION, where "
                        "LOCATION is a SAELens directory (cfg.json + sae_weights.safetensors), a Gemma Scope "
                        "params.npz, or repo_id:path/inside/repo on the Hugging Face hub; repeatable "
                        "[EXPLORER_SAE, ';'-separated]")
    p.add_argument("--jlens", action="append", metavar="[MODEL=]SPEC",
                   help="a Jacobian lens for /lens and /predict: a .pt file or a directory, a registry short name "
                        "or Hugging Face model id (e.g. gpt2-small), or auto (the registry's lens for the model); "
                        "MODEL= gives it to a model other than the first; repeatable [EXPLORER_JLENS, comma-separated]")
    p.add_argument("--jlens-dir", default=env("EXPLORER_JLENS_DIR", jlens.DEFAULT_DIR),
                   help="where POST /jobs/jlens_fit saves fitted lenses [EXPLORER_JLENS_DIR] (default %(default)s)")


def parse_model_arguments(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`p.parse_args(argv)` with `model` as the list of names, in order (EXPLORER_MODEL when no
    --model was given); a name given twice is a usage error."""
    args = p.parse_args(argv)
    args.model = model_names(args.model or os.environ.get("EXPLORER_MODEL", "gpt2"))
    if args.sae is None:
        args.sae = [s.strip() for s in os.environ.get("EXPLORER_SAE", "").split(";") if s.strip()]
    if len(set(args.model)) != len(args.model):
        p.error(f"--model names a model twice: {', '.join(args.model)}")
    return args


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """The app configuration the model flags give."""
    return {"MODEL": args.model,
            "RANDOM_WEIGHTS": args.random_weights, "DEVICE": args.device, "DTYPE": args.dtype,
            "DEVICE_MAP": args.device_map, "MAX_MEMORY": args.max_memory, "OFFLOAD_DIR": args.offload_dir,
            "SAES": args.sae,
            "JLENS": model_names(args.jlens or os.environ.get("EXPLORER_JLENS", "")), "JLENS_DIR": args.jlens_dir}


def load_configured(config: dict[str, Any]) -> list[LoadedModel] | None:
    """Load the models `config` (from `model_config`) names, logging each; None after printing why
    when they cannot be loaded (a bad flag, an unreachable hub, a missing directory)."""
    names = config["MODEL"]
    log.info("Loading %s on %s ...", "random GPT-2 weights" if config["RANDOM_WEIGHTS"] else ", ".join(names),
             config["DEVICE_MAP"] or resolve_device(config["DEVICE"]))
    try:
        if isinstance(config["MAX_MEMORY"], str):
            config["MAX_MEMORY"] = parse_max_memory(config["MAX_MEMORY"])
        models = load_models(names, config)
        config["SAES"] = [load_sae(spec) for spec in config.get("SAES", [])]
        jlens.attach(models, config["JLENS"])
    except ModelLoadError as exc:
        print(f"\nerror: {exc}\n", file=sys.stderr)
        return None
    for model in models:
        cfg = model.cfg
        weights = {"random": "RANDOM weights: predictions are meaningless", "pretrained": "pretrained weights",
                   "local": f"weights from {model.path}"}[model.weights]
        log.info("Loaded %s (%s, %s) on %s, dtype %s, in %.1f s: %d layers, %d heads, d_model %d, "
                 "vocab %d, n_ctx %d", model.name, model.family, weights, model.device, model.dtype,
                 model.load_seconds, cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab, cfg.n_ctx)
    for sae in config["SAES"]:
        log.info("Loaded SAE %s (%s, %d features) reading %s", sae.name, sae.architecture, sae.d_sae, sae.hook)
    return models


def attach_saes(models: Models, saes: Sequence[SAE | str]) -> None:
    """Serve each SAE (loading those given as `--sae` strings) on the model it names (`model=`),
    else the default model. `ModelLoadError` when one does not fit its model."""
    for sae in saes:
        sae = load_sae(sae) if isinstance(sae, str) else sae
        if sae.model is not None and sae.model not in models.by_name:
            raise ModelLoadError(f"SAE {sae.name!r} names model={sae.model}, which is not loaded; loaded: "
                                 f"{', '.join(models.by_name)}")
        models.get(sae.model).add_sae(sae)


def create_app(config: dict[str, Any] | None = None,
               model: LoadedModel | Sequence[LoadedModel] | dict[str, LoadedModel] | None = None) -> Flask:
    """Build the app. `model` is injected by tests: one, several (the first is the default), or
    {name: model} (requests name them by these keys); otherwise `config["MODEL"]` is loaded."""
    app = Flask(__name__, static_folder=str(STATIC), static_url_path="/static")  # the viewer: GET / and /static/*
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    app.json.sort_keys = False
    if model is None:
        model = load_models(model_names(app.config["MODEL"]), app.config)
    if isinstance(model, dict):
        model = [dataclasses.replace(m, name=name) for name, m in model.items()]
    loaded = [model] if isinstance(model, LoadedModel) else list(model)
    budget = CacheBudget(app.config["CACHE_BYTES"])  # one bound for all models' caches
    models = Models([Explorer(m, queue_size=app.config["QUEUE_SIZE"], budget=budget,
                              work_bytes=app.config["WORK_BYTES"], lens_dir=app.config["JLENS_DIR"]) for m in loaded])
    attach_saes(models, app.config["SAES"])
    app.extensions["models"] = models
    app.extensions["explorer"] = models.default
    app.extensions["jobs"] = JobManager()
    app.extensions["openapi"] = openapi.build(models.default.info())
    web.register(app)

    from flask_cors import CORS
    CORS(app, origins=app.config["CORS_ORIGINS"], supports_credentials=False,
         expose_headers=["Server-Timing", "Retry-After", "Location"])

    @app.before_request
    def check_host() -> Response | None:
        g.started = time.perf_counter()
        if app.config["CHECK_HOST"] and host_name(request.host.lower()) not in LOOPBACK_HOSTS:
            return error("Host header must be localhost, 127.0.0.1 or [::1] (the server is bound "
                         "to loopback; start it with --host to serve other names)", 400)
        return None

    @app.after_request
    def server_timing(response: Response) -> Response:
        # Time spent inside the app (parse, cache or model, JSON): browser devtools show it, and
        # the benchmark reads it to separate server work from HTTP overhead.
        if "started" in g:
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - g.started) * 1000:.3f}"
        return response

    @app.errorhandler(InvalidRequest)
    def invalid(exc: InvalidRequest) -> Response:
        return error(str(exc), 400)

    @app.errorhandler(UnsupportedType)
    def unsupported(_: UnsupportedType) -> Response:
        return error("Content-Type must be application/json", 415)

    @app.errorhandler(Overloaded)
    def overloaded(exc: Overloaded) -> Response:
        return error(f"server busy: {exc}", 503, {"Retry-After": str(exc.retry_after)})

    @app.errorhandler(Cancelled)
    def cancelled(_: Cancelled) -> Response:  # a synchronous request whose client left: nobody reads it
        return error("cancelled: the client disconnected", 499)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        messages = {
            404: f"no endpoint {request.path}; see GET /openapi.json or API.md",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"request body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }
        return error(messages.get(exc.code or 500, exc.description or exc.name), exc.code or 500,
                     dict(exc.get_headers()) if exc.code == 405 else None)

    @app.errorhandler(Exception)
    def internal(exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return error("internal error (details are in the server log)", 500)

    return app
