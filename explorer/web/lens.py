"""Reading the prediction: the logit-lens grid (/lens), token scores (/score) and direct logit
attribution (/dla)."""
from __future__ import annotations

from typing import Literal, Optional

from flask import Blueprint, Response
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr

from .. import lens, openapi
from ..schemas import OBJECTIVE_DOC, Request, TextRequest, TokenRef, TokenSpec
from .common import json_response, parse

bp = Blueprint("lens", __name__)

def _in_branch(kind: str, **bounds: object):
    """json_schema_extra adding `bounds` to the `kind` branch of an optional field's anyOf."""
    def extra(schema: dict) -> None:
        next(s for s in schema["anyOf"] if s.get("type") == kind).update(bounds)
    return extra


class LensRequest(TextRequest):
    positions: Optional[list[StrictInt]] = Field(default=None, json_schema_extra=_in_branch(
        "array", minItems=1, maxItems=lens.LENS_MAX_POSITIONS, uniqueItems=True,
        items={"type": "integer", "minimum": 0}),
        description=f"Positions to read (distinct, 0 .. seq-1); default: every position. At most "
                    f"{lens.LENS_MAX_POSITIONS}.")
    target: Optional[TokenSpec] = Field(default=None, description=(
        "A token to follow: a string that is exactly one token (mind the leading space: ' Paris') "
        "or a token id."))
    top_k: StrictInt = Field(default=1, json_schema_extra={"minimum": 1, "maximum": lens.LENS_GRID_TOP_K_MAX},
                             description=f"Top tokens per cell, 1 .. {lens.LENS_GRID_TOP_K_MAX}.")


class ScoreRequest(Request):
    texts: Optional[list[StrictStr]] = Field(default=None, json_schema_extra=_in_branch(
        "array", minItems=1, maxItems=lens.SCORE_MAX_TEXTS, items={"type": "string", "minLength": 1}),
        description=f"1 .. {lens.SCORE_MAX_TEXTS} texts, run as one padded batch; or give `text`.")
    text: Optional[StrictStr] = Field(default=None, min_length=1, description="One text (instead of `texts`).")
    temperature: StrictFloat = Field(default=1.0, json_schema_extra={
        "minimum": lens.TEMPERATURE_MIN, "maximum": lens.TEMPERATURE_MAX},
        description="Temperature of `final` only (token_logprobs and perplexity are always at 1).")
    top_k: StrictInt = Field(default=5, description="Entries of `final`, 1 .. 100.")


class DlaRequest(TextRequest):
    answer: TokenSpec = Field(description="The answer token: a string that is exactly one token "
                                          "(mind the leading space: ' Paris'), or a token id.")
    distractor: Optional[TokenSpec] = Field(default=None, description=(
        "A competing token (same form). With it the metric is logit[answer] - logit[distractor]; "
        "without it, the answer's logit."))
    position: Optional[StrictInt] = Field(default=None, json_schema_extra=_in_branch("integer", minimum=0), description=(
        "Position whose next-token logits are attributed, 0 .. seq-1; default: the last."))


class LensToken(BaseModel):
    token: str
    token_id: int
    probability: float


class LensTarget(BaseModel):
    token: str
    token_id: int
    probability: list[list[float]] = Field(description="[n_layers][positions]")
    rank: list[list[int]] = Field(description="[n_layers][positions]; 1 = top")
    crossover_layer: list[Optional[int]] = Field(description=(
        "Per position: the first layer from which the target stays top-1 through the last layer; "
        "null if it is not top-1 at the last layer."))


class LensResponse(BaseModel):
    objective: Literal["next_token", "masked"] = Field(description=OBJECTIVE_DOC)
    tokens: list[str] = Field(description="Every token of the text (positions index into it).")
    positions: list[int]
    top: list[list[list[LensToken]]] = Field(description="[n_layers][positions][top_k], most probable first.")
    entropy: list[list[float]] = Field(description="[n_layers][positions], nats.")
    kl_to_final: list[list[float]] = Field(description="KL(final || layer) in nats, [n_layers][positions].")
    final: list[list[LensToken]] = Field(description="The model's own top_k (the last layer), [positions][top_k].")
    target: Optional[LensTarget]


class ScoreToken(BaseModel):
    token: str
    token_id: int
    logit: float
    logprob: float
    probability: float


class TextScore(BaseModel):
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[Optional[float]] = Field(description="log P(token | prefix); null for the first token.")
    perplexity: Optional[float] = Field(description="exp(-mean(token_logprobs)); null with no scored token.")
    final: list[ScoreToken] = Field(description="Next token after the last, at the temperature.")


class ScoreResponse(BaseModel):
    temperature: float
    results: list[TextScore]


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


openapi.POSTS["/lens"] = (LensRequest, LensResponse,
                          "Logit lens grid: every layer at every (or the given) position, with a target's trajectory.")
openapi.POSTS["/score"] = (ScoreRequest, ScoreResponse,
                           "Token log-probabilities, perplexity and the next-token distribution of 1-16 texts.")
openapi.POSTS["/dla"] = (DlaRequest, DlaResponse,
                         "Direct logit attribution: embedding, attention, MLP and head contributions to a metric.")


@bp.post("/lens")
def lens_grid() -> Response:
    req, ex = parse(LensRequest)
    return json_response(ex.lens(req.text, req.positions, req.target, req.top_k))


@bp.post("/score")
def score() -> Response:
    req, ex = parse(ScoreRequest)
    return json_response(ex.score(lens.texts_of(req.texts, req.text), req.temperature, req.top_k))


@bp.post("/dla")
def dla() -> Response:
    req, ex = parse(DlaRequest)
    return json_response(ex.dla(req.text, req.answer, req.distractor, req.position))
