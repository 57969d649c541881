"""What the server is: the viewer, health, the loaded models, the OpenAPI document."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .common import json_response, models

bp = Blueprint("info", __name__)


@bp.get("/")
def viewer() -> Response:
    return current_app.send_static_file("index.html")


@bp.get("/health")
def health() -> Response:
    loaded = models()
    ex = loaded.default
    body = {"status": "ok", "model": ex.model.name, "queue": ex.worker.pending(), "cache": ex.cache.stats()}
    if len(loaded.by_name) > 1:  # one model: the original answer, unchanged
        body["models"] = {name: {"queue": m.worker.pending(), "cache": m.cache.stats()}
                          for name, m in loaded.by_name.items()}
    return json_response(body)


@bp.get("/model")
def model_info() -> Response:
    return json_response(models().get(request.args.get("model")).info())


@bp.get("/models")
def models_info() -> Response:
    return json_response(models().describe())


@bp.get("/saes")
def saes_info() -> Response:
    """Every loaded SAE, of every model (each names its model)."""
    return json_response({"saes": [sae.info() for ex in models().by_name.values() for sae in ex.saes.values()]})


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return json_response(current_app.extensions["openapi"])
