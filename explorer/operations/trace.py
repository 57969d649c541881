"""POST /trace: each token's residual-stream trajectory through every layer, in one shared 2D PCA."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field, StrictInt

from ..errors import InvalidRequest
from ..math import forward as fw
from ..session import Explorer, cache_key
from .base import TextRequest, check_positions, operation, shape


class TraceRequest(TextRequest):
    token_indices: Optional[list[StrictInt]] = Field(
        default=None, description=("Token positions to trace (distinct); default: the text's own tokens "
                                    "(not BOS, [CLS] or [SEP])."))


class TraceToken(BaseModel):
    index: int
    token_str: str


class TracePoint(BaseModel):
    layer: int
    x: float
    y: float


class TraceResponse(BaseModel):
    tokens: list[TraceToken]
    trajectories: dict[str, list[TracePoint]] = Field(
        description="Token index (as a string) -> one 2D point per layer, in one shared PCA space.")
    token_indices: list[int]
    pca_explained_variance: list[float] = Field(min_length=2, max_length=2)


@operation("/trace", TraceRequest, TraceResponse,
           "Residual-stream trajectories of tokens through every layer, in one shared 2D PCA.")
def trace(ex: Explorer, req: TraceRequest) -> dict[str, Any]:
    _, strs = ex.tokens(req.source)
    seq, n_layers = len(strs), int(ex.cfg.n_layers)
    # default: the text's own tokens (not BOS or another special token), or position 0 if none
    indices = check_positions("token_indices", req.token_indices if req.token_indices is not None
                              else list(ex.text_positions(seq)) or [0], seq)
    if len(indices) * n_layers < 2:
        raise InvalidRequest("trace needs at least 2 points (tokens x layers) for a 2D PCA")
    run = ex.run(req.source)
    xy, explained = ex.cached(cache_key("trace", req.source, tuple(indices)), lambda: fw.trace_pca(run, indices))
    return shape(
        TraceResponse,
        tokens=[{"index": i, "token_str": strs[i]} for i in indices],
        trajectories={str(i): [{"layer": l, "x": float(xy[k, l, 0]), "y": float(xy[k, l, 1])}
                               for l in range(xy.shape[1])] for k, i in enumerate(indices)},
        token_indices=indices,
        pca_explained_variance=[float(v) for v in explained],
    )
