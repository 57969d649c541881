"""The original endpoints: model info, tokenize, trace, attention, predict, and the viewer."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from .. import schemas
from ..analysis import InvalidRequest
from .common import json_response, models, parse

bp = Blueprint("core", __name__)


# Bytes that bound one serialized weight and its comma: "1.234e-10," (4 significant digits),
# "1.2345678e-10," (float32's shortest repr); exact zeros (masked positions) are "0.0,".
VALUE_BYTES = {"compact": 10, "full": 15}
ZERO_BYTES = 4


def check_size(estimate: int) -> None:
    """Refuse before building a response of about `estimate` bytes over MAX_RESPONSE_BYTES."""
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
    heads = 1 if req.head is not None else int(ex.model.cfg.n_heads)
    nonzero = seq * (seq + 1) // 2 if ex.model.causal else seq * seq  # a causal row sees no later key
    per_head = nonzero * VALUE_BYTES[req.precision] + (seq * seq - nonzero) * ZERO_BYTES
    check_size(heads * per_head)
    return json_response(ex.attention(req.text, req.layer, req.head, req.precision))


@bp.post("/predict")
def predict() -> Response:
    req, ex = parse(schemas.PredictRequest)
    return json_response(ex.predict(req.text, req.token_index, req.top_k))
