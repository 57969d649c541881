"""The original endpoints: model info, tokenize, trace, attention, predict, and the viewer."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .. import schemas
from ..analysis import InvalidRequest
from .common import json_response, models, parse

bp = Blueprint("core", __name__)


def check_size(elements: int) -> None:
    """Refuse before building a response over MAX_RESPONSE_BYTES."""
    # 7 bytes bound one rounded float and its comma ("0.1234,")
    estimate = elements * 7
    limit = current_app.config["MAX_RESPONSE_BYTES"]
    if estimate > limit:
        raise InvalidRequest(
            f"the response would be about {estimate >> 20} MiB, over the server's limit of "
            f"{limit >> 20} MiB; ask for one head or a shorter text")


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
    return json_response(models().get(request.args.get("model")).model.info())


@bp.get("/models")
def models_info() -> Response:
    return json_response(models().describe())


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return json_response(current_app.extensions["openapi"])


@bp.post("/tokenize")
def tokenize() -> Response:
    req, ex = parse(schemas.TextRequest)
    return json_response(ex.tokenize(req.text))


@bp.post("/trace")
def trace() -> Response:
    req, ex = parse(schemas.TraceRequest)
    return json_response(ex.trace(req.text, req.token_indices))


@bp.post("/attention")
def attention() -> Response:
    req, ex = parse(schemas.AttentionRequest)
    seq = len(ex.tokens(req.text)[0])
    check_size(seq * seq * (1 if req.head is not None else int(ex.model.cfg.n_heads)))
    return json_response(ex.attention(req.text, req.layer, req.head))


@bp.post("/predict")
def predict() -> Response:
    req, ex = parse(schemas.PredictRequest)
    return json_response(ex.predict(req.text, req.token_index, req.top_k))
