"""Steering vectors, as requests name them (`steer` of /generate) and POST /steering_vector, which
builds one and shows it: its values, norm, and the tokens it promotes and suppresses through the
unembedding, so a user can inspect a vector before steering with it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math import sae as sae_math
from ..math import steering
from ..math.steps import Steps
from ..session import Explorer
from . import precision
from .base import (AsyncRequest, Cost, TokenRef, TokenSpec, admit, check_count, check_index, check_top_k, each_text,
                   forward_work, operation, require_causal, shape, token_id)
from .predict import loaded_lens

MAX_CONTRAST_TEXTS = 64
MAX_COEFFICIENT = 1e6
MAX_PROMOTED = 100
STRICT = ConfigDict(strict=True, extra="forbid")


class ActAddVector(BaseModel):
    model_config = STRICT
    kind: Literal["actadd"]
    positive: StrictStr = Field(min_length=1, description="The prompt added (e.g. \"Love\").")
    negative: StrictStr = Field(min_length=1, description="The prompt subtracted (e.g. \"Hate\").")


class MeanDiffVector(BaseModel):
    model_config = STRICT
    kind: Literal["mean_diff"]
    positive: list[StrictStr] = Field(description=f"1 .. {MAX_CONTRAST_TEXTS} texts whose mean is added.")
    negative: list[StrictStr] = Field(description=f"1 .. {MAX_CONTRAST_TEXTS} texts whose mean is subtracted.")


class ValuesVector(BaseModel):
    model_config = STRICT
    kind: Literal["values"]
    values: list[float] = Field(description="d_model numbers.")


class FeatureVector(BaseModel):
    model_config = STRICT
    kind: Literal["feature"]
    sae: StrictStr = Field(description="A loaded SAE (GET /saes) that writes into the residual stream.")
    index: StrictInt = Field(description="The feature, 0 .. d_sae-1: its decoder direction is the vector.")


class JLensVector(BaseModel):
    model_config = STRICT
    kind: Literal["jlens"]
    token: TokenSpec = Field(description="The token to steer toward: a string that is exactly one token, or an id.")
    jlens: Optional[StrictStr] = Field(default=None, description=(
        "Which loaded Jacobian lens (GET /model: lenses[].name); default: the first."))


Vector = Annotated[Union[ActAddVector, MeanDiffVector, ValuesVector, FeatureVector, JLensVector], Field(
    discriminator="kind", description=(
        'actadd: the residual of `positive` minus that of `negative`, position by position (the shorter '
        'padded on the right with the space token); mean_diff: the mean last-position residual of the '
        'positive texts minus that of the negative texts; values: given; feature: an SAE feature\'s '
        'decoder direction (SAEs on resid_pre, resid_post, attn_out or mlp_out); jlens: the Jacobian lens vector '
        'of `token` at the layer, J[layer]^T W_U[:, token] (TransformerLens\' JacobianLens.lens_vectors), '
        'added at resid_post of a layer the lens has a matrix for. The library\'s steering hooks add it '
        'as unit: true with coefficient alpha x the median residual norm.'))]


class VectorFields(BaseModel):
    """What makes a steering vector (shared by /steering_vector and each `steer` addition)."""

    layer: Optional[StrictInt] = Field(default=None, description=(
        "The block, 0 .. n_layers-1. Required, except for a feature vector: default the SAE's layer."))
    site: Optional[Literal["resid_pre", "resid_post"]] = Field(default=None, description=(
        "resid_pre (default): the residual stream entering the block; resid_post: leaving it. The vector "
        "is read and added there. A feature vector's default: resid_pre for an SAE on resid_pre, else "
        "resid_post (where an attention or MLP output has been added); a jlens vector: resid_post (its only site)."))
    vector: Vector
    coefficient: float = Field(default=1.0, description=f"Multiplies the vector; |coefficient| <= {MAX_COEFFICIENT:g}.")
    unit: StrictBool = Field(default=False, description=(
        "true: scale the vector (each position's row, for actadd) to norm 1 before the coefficient."))


class SteerAddition(VectorFields):
    model_config = STRICT
    positions: Optional[Union[Literal["all", "prompt", "generated"], list[StrictInt]]] = Field(
        default=None, description=(
            'Where it is added: "all" (every position, prompt and generated), "prompt", "generated" (the '
            'generated tokens\' positions) or a list of positions. Default: "all"; actadd: the sequence\'s '
            'first positions, one per row (no other choice).'))


class SteeringVectorRequest(VectorFields, AsyncRequest):
    top_k: StrictInt = Field(default=10, description=f"Tokens promoted and suppressed listed, 1 .. {MAX_PROMOTED}.")


class TokenValue(TokenRef):
    value: float = Field(description="Its entry of vector @ W_U (logit units, 6 decimals).")


class SteeringVectorResponse(BaseModel):
    layer: int
    site: str
    kind: str
    values: Union[list[float], list[list[float]]] = Field(description=(
        "The vector as added (coefficient and unit applied): [d_model], or [positions][d_model] for actadd."))
    norm: Union[float, list[float]] = Field(description="Its norm (one per position for actadd).")
    tokens: Optional[list[str]] = Field(description="actadd: the padded positive and negative tokens per row.")
    promotes: list[TokenValue] = Field(description=(
        "The tokens whose logits the vector raises most, read through the unembedding (W_U, no final "
        "norm; actadd: the sum of its rows)."))
    suppresses: list[TokenValue]


@dataclass
class Planned:
    """A validated vector: `build()` computes it on the worker (forward passes of its prompts)."""

    spec: VectorFields
    layer: int  # where it is read and added (the request's, or a feature's default)
    site: str
    build: Callable[[], Steps]
    passes: float  # its forward work (admission) ...
    seq: int  # ... on texts of about this many tokens
    tokens: list[str] | None = None  # actadd: the rows' tokens, "positive / negative"


def plan(ex: Explorer, spec: VectorFields, where: str) -> Planned:
    """Check `spec` (400 naming `where`.field) and plan its computation."""
    d_model, n_layers = int(ex.cfg.d_model), int(ex.cfg.n_layers)
    vector, bridge = spec.vector, ex.bridge
    layer, site = spec.layer, spec.site or ("resid_post" if isinstance(vector, JLensVector) else "resid_pre")
    if isinstance(vector, FeatureVector):
        try:
            sae = ex.sae(vector.sae)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}vector.{exc}") from None
        check_index(f"{where}vector.index", vector.index, sae.d_sae)
        direction = sae_math.output_direction(sae, vector.index)
        if direction is None or sae.d_in != d_model:
            raise InvalidRequest(f"{where}vector: SAE {sae.name!r} reads {sae.hook}, whose features are not directions "
                                 "in the residual stream (steer with an SAE on resid_pre, resid_post, attn_out or mlp_out)")
        layer = sae.layer if layer is None else layer
        site = spec.site or ("resid_pre" if sae_math.hook_kind(sae.hook) == "resid_pre" else "resid_post")
    if layer is None:
        raise InvalidRequest(f"{where}layer is required (the block, 0 .. {n_layers - 1})")
    check_index(f"{where}layer", layer, n_layers)
    if not math.isfinite(spec.coefficient) or abs(spec.coefficient) > MAX_COEFFICIENT:
        raise InvalidRequest(f"{where}coefficient must be a finite number with |coefficient| <= "
                             f"{MAX_COEFFICIENT:g}, got {spec.coefficient}")

    def finish(raw: torch.Tensor) -> torch.Tensor:
        return steering.scaled(raw, spec.coefficient, spec.unit)

    if isinstance(vector, FeatureVector):
        def decoded() -> Steps:
            return finish(direction.detach().float().cpu().clone())
            yield  # a generator: computed on the worker like the others
        return Planned(spec, layer, site, decoded, 0.0, 1)
    if isinstance(vector, ValuesVector):
        if len(vector.values) != d_model:
            raise InvalidRequest(f"{where}vector.values must hold d_model = {d_model} numbers, got {len(vector.values)}")
        if not all(math.isfinite(v) for v in vector.values):
            raise InvalidRequest(f"{where}vector.values must be finite numbers")

        def given() -> Steps:
            return finish(torch.tensor(vector.values, dtype=torch.float32))
            yield  # a generator: computed on the worker like the others
        return Planned(spec, layer, site, given, 0.0, 1)
    if isinstance(vector, JLensVector):
        jl = loaded_lens(ex, vector.jlens, f"{where}vector.jlens")
        if layer not in jl.lens.jacobians:
            raise InvalidRequest(f"{where}layer: Jacobian lens {jl.name!r} has matrices for layers "
                                 f"{jl.lens.source_layers}, not {layer}")
        if site != "resid_post":
            raise InvalidRequest(f"{where}site must be \"resid_post\" for a jlens vector: the lens maps the output of "
                                 f"block {layer}, and its vector lives there")
        token = token_id(ex, f"{where}vector.token", vector.token)

        def lens_vector() -> Steps:
            return finish(jl.lens.lens_vectors(bridge, token, layer)[0])
            yield  # a generator, as the others
        return Planned(spec, layer, site, lens_vector, 0.0, 1)
    if isinstance(vector, ActAddVector):
        (pos, pos_strs), (neg, neg_strs) = ex.tokens(vector.positive), ex.tokens(vector.negative)
        space = ex.encode(" ")
        pad = space[0] if len(space) == 1 else int(ex.model.tokenizer.pad_token_id or 0)
        length = max(len(pos), len(neg))
        padded = [strs + (ex.vocab_strs[pad],) * (length - len(strs)) for strs in (pos_strs, neg_strs)]
        rows = [f"{p} / {n}" for p, n in zip(*padded)]

        def contrast() -> Steps:
            return finish(steering.actadd(bridge, pos, neg, pad, layer, site))
            yield  # a generator, as the others
        return Planned(spec, layer, site, contrast, 2 * forward_work(layer + 1, length), length, rows)
    for name, texts in (("positive", vector.positive), ("negative", vector.negative)):
        check_count(f"{where}vector.{name}", texts, MAX_CONTRAST_TEXTS)
    positive = [ids for ids, _ in each_text(ex, f"{where}vector.positive", vector.positive)]
    negative = [ids for ids, _ in each_text(ex, f"{where}vector.negative", vector.negative)]

    def means() -> Steps:
        sides = []
        for texts in (positive, negative):
            sides.append(steering.last_position_mean(bridge, texts, layer, site))
            yield len(sides) / 2
        return finish(sides[0] - sides[1])
    passes = sum(forward_work(layer + 1, len(ids)) for ids in positive + negative)
    return Planned(spec, layer, site, means, passes, max(len(ids) for ids in positive + negative))


def token_values(ex: Explorer, ids: list[int], values: list[float]) -> list[dict[str, Any]]:
    return [{"token": ex.vocab_strs[i], "token_id": i, "value": precision.log_value(v)} for i, v in zip(ids, values)]


@operation("/steering_vector", SteeringVectorRequest, SteeringVectorResponse,
           "Build a steering vector (ActAdd, mean difference, an SAE feature or given values) and show it: values, norm, "
           "and the tokens it promotes and suppresses through the unembedding.", mode="steps")
def steering_vector(ex: Explorer, req: SteeringVectorRequest) -> Steps:
    require_causal(ex, "POST /steering_vector")
    top_k = check_top_k(req.top_k, MAX_PROMOTED, int(ex.cfg.d_vocab))
    planned = plan(ex, req, "")
    admit(ex, Cost(planned.passes, planned.seq, 0), req.run_async, "use fewer or shorter contrast texts")

    def steps() -> Steps:
        vector = yield from planned.build()
        total = vector.sum(0) if vector.dim() == 2 else vector
        up_ids, up, down_ids, down = steering.through_unembedding(ex.bridge, total, top_k)
        norm = vector.norm(dim=-1)
        return shape(SteeringVectorResponse, layer=planned.layer, site=planned.site, kind=req.vector.kind,
                     values=vector.cpu().numpy(), norm=norm.tolist() if vector.dim() == 2 else float(norm),
                     tokens=planned.tokens, promotes=token_values(ex, up_ids, up),
                     suppresses=token_values(ex, down_ids, down))

    return steps()
