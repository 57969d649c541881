"""Causal interventions: activation patching (/patch) and causal tracing (/causal_trace)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from flask import Blueprint, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from .. import openapi, patching, tracing
from ..schemas import Request, TokenRef, TokenSpec
from .common import parse, run_job

bp = Blueprint("causal", __name__)

Grid = Union[list[list[float]], list[list[list[float]]]]


class AsyncRequest(Request):
    run_async: StrictBool = Field(default=False, alias="async", description=(
        "true: answer 202 {job} at once and compute in the background (GET /jobs/{job})."))


class TargetRequest(AsyncRequest):
    answer: TokenSpec = Field(description="The answer token: a string that is exactly one token "
                                          "(mind the leading space: ' Mary'), or a token id.")
    distractor: Optional[TokenSpec] = Field(default=None, description=(
        "A competing token (same form). With it the metric is logit[answer] - logit[distractor]; "
        "without it, log P(answer)."))


class PatchRequest(TargetRequest):
    clean: StrictStr = Field(min_length=1, description="The clean prompt.")
    corrupt: StrictStr = Field(min_length=1, description="The corrupt prompt; same token count as clean.")
    site: Literal["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position"] = Field(description=(
        "What one cell patches: the residual stream entering a block, a block's attention or MLP "
        "output (one layer at one position), one head's hook_z at every position (heads), or at "
        "one position (heads_by_position)."))
    direction: Literal["denoise", "noise"] = Field(default="denoise", description=(
        "denoise: run corrupt, patch in clean activations; noise: run clean, patch in corrupt."))


class GridResponse(BaseModel):
    """What every clean/corrupt grid answer holds (`patching.grid_response`)."""

    site: str
    direction: str
    metric: str = Field(description="logit_diff (with a distractor) or logprob.")
    clean_metric: float
    corrupt_metric: float
    tokens_clean: list[str]
    tokens_corrupt: list[str]
    answer: TokenRef
    distractor: Optional[TokenRef]
    effect: Grid = Field(description="The metric after each patch: [n_layers][seq], [n_layers][n_heads] "
                                     "or [n_layers][n_heads][seq].")
    recovery: Optional[Grid] = Field(description="(effect - corrupt) / (clean - corrupt); null when "
                                                 "clean and corrupt metrics are equal (see warning).")
    rows: list[str]
    columns: list[str]
    positions: Optional[list[str]] = None
    warning: Optional[str] = None


class PatchResponse(GridResponse):
    cells_computed: int = Field(description="Cells run; the others patch an activation equal to the "
                                            "base run's, so their effect is the base metric.")


openapi.POSTS["/patch"] = (PatchRequest, PatchResponse,
                           "Activation patching between a clean and a corrupt prompt, batched.")
openapi.ASYNC.add("/patch")


@bp.post("/patch")
def patch() -> Response:
    req, ex = parse(PatchRequest)
    target = ex.target(req.answer, req.distractor)
    steps = patching.patch(ex, req.clean, req.corrupt, target, req.site, req.direction)
    return run_job("patch", steps, ex, req.run_async)


class CausalTraceRequest(AsyncRequest):
    text: StrictStr = Field(min_length=1, description="The prompt, e.g. 'The Eiffel Tower is in the city of'.")
    subject: Union[StrictStr, list[StrictInt]] = Field(description=(
        "The subject to corrupt: a substring of text occurring once (every token overlapping it), "
        "or a list of token positions."))
    answer: Optional[TokenSpec] = Field(default=None, description=(
        "The token whose probability is traced (one token or an id); default: the model's top-1 "
        "prediction on the clean text."))
    kind: Literal["resid", "mlp", "attn"] = Field(default="resid", description=(
        "resid: restore the residual stream after block l at one position; mlp/attn: restore that "
        "sublayer's output at one position in a window of layers around l."))
    noise: Optional[float] = Field(default=None, description=(
        "Standard deviation of the Gaussian noise added to the subject's embeddings; default 3 x the "
        "standard deviation of the model's token embeddings."))
    samples: StrictInt = Field(default=tracing.DEFAULT_SAMPLES, description="Noise draws averaged per cell, 1 .. 50.")
    seed: StrictInt = Field(default=0, description="Seed of the noise draws; the same seed gives the same answer.")
    window: Optional[StrictInt] = Field(default=None, description=(
        "Layers restored together for mlp/attn, 1 .. n_layers, clipped at the first and last layer; "
        "default 10 (ROME's), or n_layers if smaller."))


class CausalTraceResponse(BaseModel):
    tokens: list[str]
    subject_positions: list[int]
    kind: str
    answer: TokenRef
    clean_prob: float
    corrupt_prob: float
    scores: list[list[float]] = Field(description="[n_layers][seq]: P(answer) after restoring that cell.")
    recovery: Optional[list[list[float]]] = Field(description="(score - corrupt) / (clean - corrupt); null when "
                                                              "clean and corrupt probabilities are equal.")
    noise: float = Field(description="The noise standard deviation used.")
    samples: int
    seed: int
    window: Optional[int] = Field(description="Layers restored together (null for resid).")
    warning: Optional[str] = None


openapi.POSTS["/causal_trace"] = (CausalTraceRequest, CausalTraceResponse,
                                  "ROME-style causal tracing: restore clean states into noise-corrupted runs.")
openapi.ASYNC.add("/causal_trace")


@bp.post("/causal_trace")
def causal_trace() -> Response:
    req, ex = parse(CausalTraceRequest)
    steps = tracing.causal_trace(ex, req.text, req.subject, req.answer, req.kind, req.noise, req.samples,
                                 req.seed, req.window)
    return run_job("causal_trace", steps, ex, req.run_async)
