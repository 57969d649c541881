"""POST /feature: one SAE feature on a text — its activation at every token, the tokens its decoder
direction promotes and suppresses through the unembedding, its direct logit attribution to a
target, and (with `edit`) the target's metric with the feature ablated or clamped: the hook's
activation replaced by the reconstruction plus the error term, edited (`math.sae.edited`), replayed
from the hook's block for each edited feature in turn, batched like /ablate."""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, Field, StrictInt

from ..errors import InvalidRequest
from ..math import patching, replay, steering
from ..math import sae as sae_math
from ..math.replay import row_bytes
from ..math.steps import Steps, over_chunks
from ..session import Explorer
from . import precision
from .base import (AsyncRequest, Cost, TokenRef, TokenSpec, admit, check_index, check_positions, check_top_k,
                   describe_target, forward_work, operation, parse_target, require_causal, shape)
from .features import SaeInfo, SaeRequest
from .steering_vector import MAX_PROMOTED, TokenValue, token_values

MAX_EDITED = 256  # features edited in turn by one request
MAX_VALUE = 1e6


class FeatureRequest(SaeRequest, AsyncRequest):
    index: StrictInt = Field(description="The feature, 0 .. d_sae-1.")
    top_k: StrictInt = Field(default=10, json_schema_extra={"minimum": 1, "maximum": MAX_PROMOTED},
                             description=f"Tokens promoted and suppressed listed, 1 .. {MAX_PROMOTED}.")
    answer: Optional[TokenSpec] = Field(default=None, description=(
        "A target token (a string that is exactly one token, or an id): the feature's direct logit "
        "attribution to it, and the metric an edit changes. Causal models only."))
    distractor: Optional[TokenSpec] = Field(default=None, description=(
        "A competing token: the metric is then logit[answer] - logit[distractor], else log P(answer)."))
    position: Optional[StrictInt] = Field(default=None, description=(
        "The position whose next-token logits the direct attribution reads, 0 .. seq-1; default: the last."))
    edit: Optional[Literal["ablate", "clamp"]] = Field(default=None, description=(
        "ablate: set the feature's activation to 0; clamp: to `value`; at `positions`. Needs `answer`. The "
        "metric is read after the last token."))
    value: Optional[float] = Field(default=None, description=f"clamp: the activation, |value| <= {MAX_VALUE:g}.")
    positions: Optional[list[StrictInt]] = Field(default=None, description=(
        "Where the edit applies (distinct, 0 .. seq-1); default: every position."))
    indices: Optional[list[StrictInt]] = Field(default=None, description=(
        f"Features edited in turn, one metric each (1 .. {MAX_EDITED} distinct); default: [index]."))


class Attribution(BaseModel):
    position: int
    value: float = Field(description=(
        "activation at the position × the decoder direction read through the final norm (its scale frozen "
        "at that position) onto the metric's unembedding direction (logit units, 6 decimals)."))


class EditResult(BaseModel):
    index: int
    metric: float = Field(description="The metric with this feature edited (float32).")
    effect: float = Field(description="metric - clean_metric (float32).")


class Edit(BaseModel):
    edit: str
    value: Optional[float]
    positions: list[int]
    metric: str = Field(description="logit_diff (with a distractor) or logprob.")
    clean_metric: float = Field(description="The metric without the edit (float32).")
    results: list[EditResult]


class FeatureResponse(BaseModel):
    sae: SaeInfo
    index: int
    tokens: list[str]
    activations: list[float] = Field(description="The feature's activation at every token (float32).")
    max_activation: float
    promotes: Optional[list[TokenValue]] = Field(description=(
        "The tokens the decoder direction raises most through the unembedding (W_U, no final norm); "
        "null for hook_z SAEs, whose decoder writes into the heads before W_O."))
    suppresses: Optional[list[TokenValue]]
    answer: Optional[TokenRef]
    distractor: Optional[TokenRef]
    attribution: Optional[Attribution] = Field(description="With an answer: the direct logit attribution.")
    edit: Optional[Edit] = Field(description="With edit: the metric with each feature edited.")


def check_value(edit: str | None, value: float | None) -> float:
    """The activation an edit sets (ablate: 0); 400 when `value` does not fit the edit."""
    if edit == "ablate":
        if value is not None:
            raise InvalidRequest("value applies to edit 'clamp' only (ablate sets the activation to 0)")
        return 0.0
    if value is None or not math.isfinite(value) or abs(value) > MAX_VALUE:
        raise InvalidRequest(f"edit 'clamp' needs value, a finite number with |value| <= {MAX_VALUE:g}, got {value}")
    return value


@operation("/feature", FeatureRequest, FeatureResponse,
           "One SAE feature on a text: activations, promoted tokens, direct attribution, and ablating or clamping it.",
           mode="steps")
def feature(ex: Explorer, req: FeatureRequest) -> Steps:
    sae = ex.sae(req.sae)
    check_index("index", req.index, sae.d_sae)
    top_k = check_top_k(req.top_k, MAX_PROMOTED, int(ex.cfg.d_vocab))
    text = req.source
    ids, strs = ex.tokens(text)
    seq = len(ids)
    target = None
    if req.answer is not None:
        require_causal(ex, "POST /feature with an answer")
        target = parse_target(ex, req.answer, req.distractor)
    elif req.distractor is not None:
        raise InvalidRequest("distractor needs an answer")
    position = seq - 1 if req.position is None else req.position
    check_index("position", position, seq)
    for name in ("value", "positions", "indices"):
        if req.edit is None and getattr(req, name) is not None:
            raise InvalidRequest(f"{name} applies only with edit ('ablate' or 'clamp')")
    indices, positions, value = [req.index], None, 0.0
    if req.edit is not None:
        if target is None:
            raise InvalidRequest("edit needs answer (the metric the edit changes)")
        if sae_math.hook_kind(sae.hook) is None:
            raise InvalidRequest(f"edits support SAEs on resid_pre, resid_post, attn_out, mlp_out or attn.hook_z; "
                                 f"{sae.name!r} reads {sae.hook}")
        value = check_value(req.edit, req.value)
        positions = None if req.positions is None else check_positions("positions", req.positions, seq)
        if req.indices is not None:
            if not 1 <= len(req.indices) <= MAX_EDITED:
                raise InvalidRequest(f"indices must hold between 1 and {MAX_EDITED} features, got {len(req.indices)}")
            for i in req.indices:
                check_index("indices[]", i, sae.d_sae)
            if len(set(req.indices)) != len(req.indices):
                raise InvalidRequest("indices must not contain duplicates")
            indices = list(req.indices)
        n_layers = int(ex.cfg.n_layers)
        admit(ex, Cost(forward_work(n_layers, seq) + len(indices) * seq * (n_layers - sae.layer), seq,
                       row_bytes(ex.cfg, seq)), req.run_async, "use a shorter text or fewer indices")

    def edits(acts: replay.Acts) -> Steps:
        """The metric after editing each feature of `indices` in turn: [len(indices)] float32."""
        x = sae_math.from_acts(acts, sae)
        f = sae_math.encode(sae, sae_math.flat(sae, x))
        start = sae.layer + (sae_math.hook_kind(sae.hook) == "resid_post")
        budget = ex.budget(seq)
        out = np.empty(len(indices), dtype=np.float32)

        def run(chunk: tuple[int, int]) -> Steps:
            begin, end = chunk
            rows = sae_math.edited(sae, x, f, indices[begin:end], torch.full((end - begin,), value), positions)
            starts, hooks = sae_math.replay_plan(sae, acts, rows)
            logits = yield from replay.run_rows(ex.bridge, acts.blocks, starts, hooks, budget)
            out[begin:end] = target.metric(logits).cpu().numpy()

        yield from over_chunks(replay.plan_chunks([start] * len(indices), 1, seq, int(ex.cfg.n_layers), budget), run)
        return out

    def steps() -> Steps:
        activations = ex.encoded(text, sae).acts[:, req.index].contiguous().cpu().numpy()
        direction = sae_math.output_direction(sae, req.index)
        promotes = suppresses = attribution = edit = None
        if direction is not None:
            up_ids, up, down_ids, down = steering.through_unembedding(ex.bridge, direction, top_k)
            promotes, suppresses = token_values(ex, up_ids, up), token_values(ex, down_ids, down)
        if target is not None and direction is not None:
            final = ex.run(text).resid[-1, position]
            dla = ex.call(lambda: sae_math.direct_attribution(ex.bridge, direction, final, target))
            attribution = {"position": position, "value": precision.log_value(float(activations[position]) * dla)}
        if req.edit is not None:
            acts = ex.acts(text)
            clean = np.float32(target.metric(patching.final_logits(ex.bridge, acts)).cpu())
            metrics = yield from edits(acts)
            edit = {"edit": req.edit, "value": None if req.edit == "ablate" else value,
                    "positions": list(range(seq)) if positions is None else positions,
                    "metric": target.metric_name, "clean_metric": clean,
                    "results": [{"index": i, "metric": m, "effect": m - clean} for i, m in zip(indices, metrics)]}
        return shape(FeatureResponse, sae=sae.info(), index=req.index, tokens=list(strs), activations=activations,
                     max_activation=activations.max(), promotes=promotes, suppresses=suppresses,
                     **(describe_target(ex, target) if target is not None else {"answer": None, "distractor": None}),
                     attribution=attribution, edit=edit)

    return steps()
