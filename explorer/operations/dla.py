"""POST /dla: direct logit attribution — the embedding, each layer's attention and MLP output and
each head, read through the final norm with its scale frozen, adding up exactly to the logit
(`math.lens.decompose`, `attribute`)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field, StrictInt

from ..math import lens
from ..math.lens import Attribution
from ..session import Explorer, cache_key
from . import precision
from .base import (TargetFields, TextRequest, TokenRef, check_index, describe_target, in_branch, operation,
                   parse_target, require_causal, shape)


class DlaRequest(TargetFields, TextRequest):
    position: Optional[StrictInt] = Field(default=None, json_schema_extra=in_branch("integer", minimum=0), description=(
        "Position whose next-token logits are attributed, 0 .. seq-1; default: the last."))


class DlaResponse(BaseModel):
    position: int
    token_str: str
    metric: str = Field(description="logit_diff (with a distractor) or logit.")
    answer: TokenRef
    distractor: Optional[TokenRef]
    embed: float
    attn: list[float] = Field(description="[n_layers]")
    mlp: list[float] = Field(description="[n_layers]")
    heads: list[list[float]] = Field(description="[n_layers][n_heads]; heads[l] + attn_bias[l] = attn[l]")
    attn_bias: list[float] = Field(description="[n_layers]: the attention output bias's share of attn.")
    bias: float = Field(description="The final norm's bias and the unembedding bias.")
    total: float = Field(description="embed + sum(attn) + sum(mlp) + bias: the metric (before any soft-cap).")
    model_metric: float = Field(description="The metric of the model's own output logits.")


@operation("/dla", DlaRequest, DlaResponse,
           "Direct logit attribution: embedding, attention, MLP and head contributions to a metric.")
def dla(ex: Explorer, req: DlaRequest) -> dict[str, Any]:
    require_causal(ex, "POST /dla")
    text = req.source
    ids, strs = ex.tokens(text)
    position = len(ids) - 1 if req.position is None else req.position
    check_index("position", position, len(ids))
    target = parse_target(ex, req.answer, req.distractor)

    def compute() -> Attribution:
        parts = ex.cached(cache_key("dla-parts", text, position), lambda: lens.decompose(ex.bridge, ids, position))
        return lens.attribute(ex.bridge, parts, target)

    a = ex.cached(cache_key("dla", text, position, target), compute)
    r = precision.log_values
    return shape(
        DlaResponse, position=position, token_str=strs[position],
        metric="logit_diff" if target.distractor is not None else "logit", **describe_target(ex, target),
        embed=r(a.embed), attn=r(a.attn), mlp=r(a.mlp), heads=r(a.heads), attn_bias=r(a.attn_bias),
        bias=r(a.bias), total=r(a.total), model_metric=r(a.model_metric))
