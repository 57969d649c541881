"""Which heads matter: ablation (/ablate), attribution patching (/attribution_patch) and causal head
gating (POST /jobs/chg)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from flask import Blueprint, Response
from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from .. import chg, heads, openapi
from ..schemas import Request, TokenRef, TokenSpec
from .causal import Grid, GridResponse, PatchRequest, TargetRequest
from .common import parse, run_job

bp = Blueprint("heads", __name__)


class AblateRequest(TargetRequest):
    text: StrictStr = Field(min_length=1, description="The prompt; the metric is read after its last token.")
    method: Literal["mean", "zero"] = Field(default="mean", description=(
        "mean: replace the activation by its mean over every position of the reference texts; "
        "zero: by zeros."))
    reference_texts: Optional[list[StrictStr]] = Field(default=None, description=(
        f"Texts whose positions the mean is taken over (method mean only), 1 .. {heads.MAX_REFERENCE_TEXTS}; "
        "default: the request's own text."))
    site: Literal["heads", "attn", "mlp"] = Field(default="heads", description=(
        "heads: one head's hook_z at every position per cell; attn / mlp: one layer's attention or "
        "MLP output at every position per cell."))


class AblateResponse(BaseModel):
    site: str
    method: str
    metric: str = Field(description="logit_diff (with a distractor) or logprob.")
    baseline: float = Field(description="The metric without ablation.")
    effect: Union[list[list[float]], list[float]] = Field(description=(
        "Metric after ablation minus baseline: [n_layers][n_heads] (heads) or [n_layers] (attn, mlp)."))
    tokens: list[str]
    answer: TokenRef
    distractor: Optional[TokenRef]
    rows: list[str]
    columns: Optional[list[str]] = Field(description="H0 .. for heads; null for attn and mlp.")
    reference_texts: Optional[int] = Field(description="How many texts the mean was taken over (null for zero).")
    reference_positions: Optional[int] = Field(description="How many positions the mean was taken over (null for zero).")


openapi.POSTS["/ablate"] = (AblateRequest, AblateResponse,
                            "Ablate each head (or layer's attention / MLP output) in turn, batched.")
openapi.ASYNC.add("/ablate")


@bp.post("/ablate")
def ablate() -> Response:
    req, ex = parse(AblateRequest)
    target = ex.target(req.answer, req.distractor)
    steps = heads.ablate(ex, req.text, target, req.method, req.reference_texts, req.site)
    return run_job("ablate", steps, ex, req.run_async)


class AttributionPatchRequest(PatchRequest):
    compare: StrictBool = Field(default=False, description=(
        "true: also run the real patching sweep (as /patch) and report how well the estimate agrees."))


class AttributionPatchResponse(GridResponse):
    attribution: Grid = Field(description=(
        "The estimated change of the metric: (source_act - base_act) . d metric / d act at the base run, "
        "summed over the site's dimensions (and positions, for heads)."))
    exact_available: bool = Field(description="Always true: compare gives the real grid.")
    exact_effect: Optional[Grid] = Field(default=None, description="compare only: /patch's effect grid.")
    exact_recovery: Optional[Grid] = Field(default=None, description="compare only: /patch's recovery grid.")
    pearson: Optional[float] = Field(default=None, description=(
        "compare only: Pearson correlation of effect and exact_effect over all cells; null when either is constant."))
    max_abs_error: Optional[float] = Field(default=None, description="compare only: max |effect - exact_effect|.")
    max_abs_error_by_layer: Optional[list[float]] = Field(default=None, description=(
        "compare only: the same per layer [n_layers]."))


openapi.POSTS["/attribution_patch"] = (AttributionPatchRequest, AttributionPatchResponse,
                                       "Attribution patching: the gradient estimate of a /patch grid, "
                                       "optionally beside the real one.")
openapi.ASYNC.add("/attribution_patch")


@bp.post("/attribution_patch")
def attribution_patch() -> Response:
    req, ex = parse(AttributionPatchRequest)
    target = ex.target(req.answer, req.distractor)
    steps = heads.attribution_patch(ex, req.clean, req.corrupt, target, req.site, req.direction, req.compare)
    return run_job("attribution_patch", steps, ex, req.run_async)


class ChgRequest(Request):
    texts: list[StrictStr] = Field(description=f"The task's prompts, 1 .. {chg.MAX_TEXTS}.")
    targets: list[TokenSpec] = Field(description=(
        "One answer per text: a string that is exactly one token (mind the leading space), or a token id."))
    steps: StrictInt = Field(default=chg.DEFAULT_STEPS, description=(
        f"Adam updates per stage (three stages), 1 .. {chg.MAX_STEPS}."))
    lr: float = Field(default=chg.DEFAULT_LR, description=f"Adam learning rate on the gate logits, (0, {chg.MAX_LR}].")
    lam: float = Field(default=chg.DEFAULT_LAMBDA, alias="lambda", description=(
        f"Strength of the pressure in stages 2 and 3, 0 .. {chg.MAX_LAMBDA}: the penalty's gradient "
        "on each head's logit."))
    seed: StrictInt = Field(default=0, description="Seed of the gates' random start, 0 .. 2^63-1.")


class ChgResult(BaseModel):
    stages: list[str] = Field(description="unregularized, toward_zero, toward_one")
    gates: dict[str, list[list[float]]] = Field(description="Stage -> final gates [n_layers][n_heads], in [0, 1].")
    loss: dict[str, float] = Field(description="Stage -> the targets' mean cross-entropy with that stage's gates.")
    loss_history: dict[str, list[float]] = Field(description="Stage -> the cross-entropy at each step.")
    loss_ungated: float = Field(description="The cross-entropy of the model itself (every gate 1).")
    taxonomy: list[list[str]] = Field(description="[n_layers][n_heads]: facilitating, interfering, irrelevant or ambiguous.")
    counts: dict[str, int]
    threshold: float = Field(description="A gate at or above it counts as kept.")
    logit_clip: float
    targets: list[TokenRef]
    n_texts: int
    steps: int
    lr: float
    lam: float = Field(alias="lambda")
    seed: int
    rows: list[str]
    columns: list[str]


openapi.POSTS["/jobs/chg"] = (ChgRequest, ChgResult,
                              "Causal head gating as a background job: 202 with its id; the job's result "
                              "is a ChgResult.")
openapi.JOB_POSTS.add("/jobs/chg")


@bp.post("/jobs/chg")
def start_chg() -> Response:
    req, ex = parse(ChgRequest)
    steps = chg.chg(ex, req.texts, req.targets, req.steps, req.lr, req.lam, req.seed)
    return run_job("chg", steps, ex, run_async=True)
