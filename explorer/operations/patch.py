"""POST /patch: activation patching between a clean and a corrupt prompt (residual stream,
attention/MLP outputs, heads), batched (`math.patching`), with recovery normalized to
[0 = no effect, 1 = clean]."""
from __future__ import annotations

from typing import Any, Literal, NamedTuple, Optional, Union

import numpy as np
from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..math import patching
from ..math.replay import Acts, row_bytes
from ..math.steps import Steps
from ..math.target import Target, recovery
from ..session import Explorer, Text
from .base import (IDS_DOC, Cost, TargetRequest, TokenRef, admit, check_same_length, describe_target, forward_work,
                   operation, parse_target, replay_work, require_causal, shape, source_of)

Grid = Union[list[list[float]], list[list[list[float]]]]
NARROW = "use shorter prompts, or a coarser site (heads instead of heads_by_position)"


class PatchRequest(TargetRequest):
    clean: Optional[StrictStr] = Field(default=None, min_length=1, description="The clean prompt.")
    corrupt: Optional[StrictStr] = Field(default=None, min_length=1, description=(
        "The corrupt prompt; same token count as clean."))
    clean_ids: Optional[list[StrictInt]] = Field(default=None, description=IDS_DOC.format(field="clean"))
    corrupt_ids: Optional[list[StrictInt]] = Field(default=None, description=IDS_DOC.format(field="corrupt"))

    site: Literal["resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position"] = Field(description=(
        "What one cell patches: the residual stream entering a block, a block's attention or MLP "
        "output (one layer at one position), one head's hook_z at every position (heads), or at "
        "one position (heads_by_position)."))
    direction: Literal["denoise", "noise"] = Field(default="denoise", description=(
        "denoise: run corrupt, patch in clean activations; noise: run clean, patch in corrupt."))

    @property
    def prompts(self) -> tuple[Text, Text]:
        """The clean and corrupt prompts, each a text or token ids."""
        return (source_of(self.clean, self.clean_ids, "clean", "clean_ids"),
                source_of(self.corrupt, self.corrupt_ids, "corrupt", "corrupt_ids"))


class GridResponse(BaseModel):
    """What every clean/corrupt grid answer holds (`grid_fields`)."""

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


def grid_fields(ex: Explorer, req: PatchRequest, target: Target, clean_metric: np.float32,
                corrupt_metric: np.float32, grid: np.ndarray) -> dict[str, Any]:
    """The fields every clean/corrupt grid answer shares (`/patch`, `/attribution_patch`), with
    `grid` as the effect and its recovery."""
    rec, warning = recovery(grid, clean_metric, corrupt_metric)
    tokens_clean, tokens_corrupt = list(ex.tokens(req.prompts[0])[1]), list(ex.tokens(req.prompts[1])[1])
    n_layers, n_heads = int(ex.cfg.n_layers), int(ex.cfg.n_heads)
    heads = req.site.startswith("heads")
    fields: dict[str, Any] = {
        "site": req.site, "direction": req.direction, "metric": target.metric_name,
        "clean_metric": clean_metric, "corrupt_metric": corrupt_metric,
        "tokens_clean": tokens_clean, "tokens_corrupt": tokens_corrupt, **describe_target(ex, target),
        "effect": grid, "recovery": rec,
        "rows": [f"L{l}" for l in range(n_layers)],
        "columns": [f"H{h}" for h in range(n_heads)] if heads else tokens_clean,
    }
    if req.site == "heads_by_position":
        fields["positions"] = tokens_clean
    if warning:
        fields["warning"] = warning
    return fields


def prepare(ex: Explorer, req: PatchRequest, endpoint: str) -> Target:
    """Validate a clean/corrupt request (400s before any work starts); its target."""
    target = parse_target(ex, req.answer, req.distractor)
    require_causal(ex, endpoint)
    check_same_length(ex, *req.prompts)
    return target


class Pair(NamedTuple):
    """A request's two prompts as patching sees them: the run patched (`base`), the run patched
    in (`source`), and the metric of each prompt and of the base."""

    base: Acts
    source: Acts
    clean_metric: np.float32
    corrupt_metric: np.float32
    base_metric: np.float32


def pair(ex: Explorer, req: PatchRequest, target: Target) -> Pair:
    """The cached activations of both prompts, ordered by the request's direction, and their metrics."""
    clean, corrupt = (ex.acts(p) for p in req.prompts)
    clean_metric, corrupt_metric = patching.pair_metrics(ex.bridge, target, clean, corrupt)
    base_metric = corrupt_metric if req.direction == "denoise" else clean_metric
    return Pair(*patching.base_and_source(req.direction, clean, corrupt), clean_metric, corrupt_metric, base_metric)


def cost(ex: Explorer, req: PatchRequest) -> Cost:
    """Both prompts' forward passes and every cell replayed from its layer, but the cells at
    positions before the prompts first differ (in a causal model their patch changes nothing,
    and they are skipped); an upper bound."""
    clean, corrupt = (ex.tokens(p)[0] for p in req.prompts)
    seq = len(clean)
    differing = seq - next((i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b), seq)
    n_layers, n_heads = int(ex.cfg.n_layers), int(ex.cfg.n_heads)
    per_layer = {"heads": n_heads, "heads_by_position": n_heads * differing}.get(req.site, differing)
    return Cost(2 * forward_work(n_layers, seq) + replay_work(n_layers, seq, per_layer), seq, row_bytes(ex.cfg, seq))


def sweep(ex: Explorer, req: PatchRequest, target: Target) -> Steps:
    """The patching grid, chunk by chunk; returns the /patch answer's fields."""
    p = pair(ex, req, target)
    cells, grid = patching.grid_cells(req.site, int(ex.cfg.n_layers), int(ex.cfg.n_heads), len(p.base.token_ids))
    effect = np.full(len(cells), p.base_metric, dtype=np.float32)
    todo = patching.changed(req.site, cells, p.base, p.source)
    effect[todo] = yield from patching.run_cells(ex.bridge, req.site, [cells[i] for i in todo], p.base, p.source,
                                                 target, ex.budget(len(p.base.token_ids)))
    fields = grid_fields(ex, req, target, p.clean_metric, p.corrupt_metric, effect.reshape(grid))
    return shape(PatchResponse, **fields, cells_computed=len(todo))


@operation("/patch", PatchRequest, PatchResponse,
           "Activation patching between a clean and a corrupt prompt, batched.", mode="steps")
def patch(ex: Explorer, req: PatchRequest) -> Steps:
    target = prepare(ex, req, "POST /patch")
    admit(ex, cost(ex, req), req.run_async, NARROW)
    return sweep(ex, req, target)
