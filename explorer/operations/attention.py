"""POST /attention: the attention pattern of a head, or of every head of a layer."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, StrictInt

from ..math.forward import layer_pattern
from ..session import Explorer, cache_key
from . import precision
from .base import TextRequest, check_index, operation, shape

# Bytes that bound one serialized weight and its comma: "1.234e-10," (4 significant digits),
# "1.2345678e-10," (float32's shortest repr); exact zeros (masked positions) are "0.0,".
VALUE_BYTES = {"compact": 10, "full": 15}
ZERO_BYTES = 4


class AttentionRequest(TextRequest):
    layer: StrictInt = Field(description="Layer, 0 .. n_layers-1.")
    head: Optional[StrictInt] = Field(
        default=None, description="Head, 0 .. n_heads-1; omitted or null: every head of the layer.")
    precision: Literal["compact", "full"] = Field(default="compact", description=(
        '"compact" (default): each weight to 4 significant digits of the cached float16 value '
        '(relative error below 1e-3; a nonzero weight is never 0). "full": the float32 weights '
        "the model computes, recomputed for this layer (one forward pass up to the layer)."))


class AttentionResponse(BaseModel):
    attention_matrix: Union[list[list[float]], list[list[list[float]]]] = Field(description=(
        "[T][T] for one head (row i: how token i attends to each token j), or [n_heads][T][T] "
        "when head is omitted or null. precision \"compact\": 4 significant digits; \"full\": float32."))
    layer: int
    head: Optional[int]
    n_heads: int
    n_layers: int
    tokens: list[str]


def response_bytes(ex: Explorer, req: AttentionRequest) -> int:
    """About how many bytes the answer takes (the server refuses answers over its limit before
    building them)."""
    seq = len(ex.tokens(req.source)[0])
    heads = 1 if req.head is not None else int(ex.cfg.n_heads)
    nonzero = seq * (seq + 1) // 2 if ex.model.causal else seq * seq  # a causal row sees no later key
    return heads * (nonzero * VALUE_BYTES[req.precision] + (seq * seq - nonzero) * ZERO_BYTES)


@operation("/attention", AttentionRequest, AttentionResponse,
           "Attention pattern of one head, or of every head of a layer.", response_bytes=response_bytes)
def attention(ex: Explorer, req: AttentionRequest) -> dict[str, Any]:
    ids, strs = ex.tokens(req.source)
    layer, head = req.layer, req.head
    check_index("layer", layer, int(ex.cfg.n_layers))
    if head is not None:
        check_index("head", head, int(ex.cfg.n_heads))
    if req.precision == "full":
        pattern = ex.cached(cache_key("pattern32", req.source, layer), lambda: layer_pattern(ex.bridge, ids, layer))
        matrix = pattern if head is None else pattern[head]
    else:
        run = ex.run(req.source)
        matrix = precision.attention_weights(run.patterns[layer] if head is None else run.patterns[layer, head])
    return shape(AttentionResponse, attention_matrix=matrix, layer=layer, head=head,
                 n_heads=int(ex.cfg.n_heads), n_layers=int(ex.cfg.n_layers), tokens=list(strs))
