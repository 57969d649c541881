"""POST /predict: the logit lens at one position — top-k predictions after every layer."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt

from ..math import forward as fw
from ..math.forward import LENS_TOP_K, Lens, Run
from ..session import Explorer, Text, cache_key
from . import precision
from .base import OBJECTIVE_DOC, TextRequest, check_index, check_top_k, objective, operation, shape

# After a /predict, idle time computes the lens of this many positions nearest the asked one, so
# clicking through positions is served from cache. One position per idle job: a request waits
# for one lens projection at most.
PREFETCH_POSITIONS = 64


class PredictRequest(TextRequest):
    token_index: StrictInt = Field(description=(
        "Position read, 0 .. seq-1: its next-token predictions (causal), or the masked-LM reading of "
        "the token at it (an encoder)."))
    top_k: StrictInt = Field(default=5, description=f"Predictions per layer, 1 .. {LENS_TOP_K}.")


class TopToken(BaseModel):
    token: str
    token_id: int
    probability: float
    logit: float


class LayerPredictions(BaseModel):
    layer: int
    top_tokens: list[TopToken]


class PredictResponse(BaseModel):
    token_index: int
    token_str: str
    objective: Literal["next_token", "masked"] = Field(description=OBJECTIVE_DOC)
    predictions_by_layer: list[LayerPredictions]


def lens_at(ex: Explorer, text: Text, run: Run, position: int) -> Lens:
    """The cached `Lens` of `text` (whose run is `run`) at `position` (shared with /lens)."""
    return ex.cached(cache_key("lens", text, position), lambda: fw.lens_top_k(ex.bridge, run, position))


@operation("/predict", PredictRequest, PredictResponse,
           "Logit lens: top-k next-token predictions at every layer for one position (an encoder: "
           "the masked-LM head's reading of the token at it).")
def predict(ex: Explorer, req: PredictRequest) -> dict[str, Any]:
    ids, strs = ex.tokens(req.source)
    check_index("token_index", req.token_index, len(ids))
    top_k = check_top_k(req.top_k, LENS_TOP_K, int(ex.cfg.d_vocab))
    lens = lens_at(ex, req.source, ex.run(req.source), req.token_index)
    _prefetch(ex, req.source, req.token_index, len(ids))
    vocab = ex.vocab_strs
    return shape(
        PredictResponse, token_index=req.token_index, token_str=strs[req.token_index], objective=objective(ex),
        predictions_by_layer=[
            {"layer": layer, "top_tokens": [
                {"token": vocab[int(lens.ids[layer, j])], "token_id": int(lens.ids[layer, j]),
                 "probability": precision.probability(lens.probs[layer, j]),
                 "logit": precision.logit(lens.logits[layer, j])} for j in range(top_k)]}
            for layer in range(lens.probs.shape[0])])


def _prefetch(ex: Explorer, text: Text, position: int, seq: int) -> None:
    """Queue idle-time lens computations for the positions nearest `position` not cached yet."""
    for p in sorted(range(seq), key=lambda p: (abs(p - position), p))[:PREFETCH_POSITIONS]:
        key = cache_key("lens", text, p)
        if ex.cache.get(key) is None:
            ex.worker.submit_idle(key, lambda p=p, key=key: _fill(ex, text, p, key))


def _fill(ex: Explorer, text: Text, position: int, key: tuple) -> None:
    """Idle job: cache the lens at `position` unless it is there or the run was evicted."""
    run = ex.cache.get(cache_key("run", text))
    if run is not None and ex.cache.get(key) is None:
        ex.cache.fill(key, fw.lens_top_k(ex.bridge, run, position))
