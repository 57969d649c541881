"""POST /attribution_patch: attribution patching (Nanda 2023), the one-backward-pass estimate of
a `/patch` grid, optionally beside the real one with their correlation and error per layer."""
from __future__ import annotations

from typing import Any, Optional

import torch
from pydantic import Field, StrictBool

from ..math import heads
from ..math.replay import row_bytes
from ..math.steps import Steps, scaled
from ..session import Explorer
from .base import Cost, admit, forward_work, operation, shape
from .patch import NARROW, Grid, GridResponse, PatchRequest, cost, grid_fields, pair, prepare, sweep

BACKWARD = 3  # a forward and backward pass costs about three forward passes


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


@operation("/attribution_patch", AttributionPatchRequest, AttributionPatchResponse,
           "Attribution patching: the gradient estimate of a /patch grid, optionally beside the real one.",
           mode="steps")
def attribution_patch(ex: Explorer, req: AttributionPatchRequest) -> Steps:
    target = prepare(ex, req, "POST /attribution_patch")
    seq, n_layers = len(ex.tokens(req.prompts[0])[0]), int(ex.cfg.n_layers)
    exact = cost(ex, req) if req.compare else Cost(2 * forward_work(n_layers, seq), seq, 0)
    # the backward pass keeps every block's activations of the base prompt
    admit(ex, Cost(exact.work + BACKWARD * forward_work(n_layers, seq), seq,
                   max(exact.memory, n_layers * row_bytes(ex.cfg, seq))), req.run_async,
          NARROW + ", or compare: false")

    def steps() -> Steps:
        p = pair(ex, req, target)
        hooks = heads.site_hooks(req.site, int(ex.cfg.n_layers))
        grads = torch.stack(heads.gradients(ex.bridge, p.base.token_ids.tolist(), target, hooks))
        attribution = heads.attribution(req.site, p.base, p.source, grads)
        fields: dict[str, Any] = {**grid_fields(ex, req, target, p.clean_metric, p.corrupt_metric,
                                                p.base_metric + attribution),
                                  "attribution": attribution, "exact_available": True}
        if req.compare:
            real = yield from scaled(sweep(ex, req, target), 0.5, 0.5)
            fields.update(exact_effect=real["effect"], exact_recovery=real["recovery"],
                          **heads.agreement(fields["effect"], real["effect"]))
        return shape(AttributionPatchResponse, **fields)

    return steps()
