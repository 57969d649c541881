"""POST /lens: the logit lens as a layers x positions grid (top-k, entropy, KL to the final layer),
with a target token's probability, rank and crossover layer; `"lens": "jacobian"` reads the same
grid through a Jacobian lens (`predict.Reading`).

Each position is read through the same cached `Lens` entry `/predict` uses, so the two
endpoints share every position either has computed.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math import forward as fw
from ..math.forward import Lens, Run
from ..math.lens import TargetLens, crossover_layer, target_lens
from ..session import Explorer, Text
from . import precision
from .base import (OBJECTIVE_DOC, TextRequest, TokenSpec, check_positions, check_top_k, in_branch, objective,
                   operation, shape, token_id)
from .predict import LensAnswer, Reading, jlens_field, lens_at, lens_field, reading

MAX_POSITIONS = 256  # per request: each position projects n_layers vectors through the unembedding
TOP_K_MAX = 10


class LensRequest(TextRequest):
    positions: Optional[list[StrictInt]] = Field(default=None, json_schema_extra=in_branch(
        "array", minItems=1, maxItems=MAX_POSITIONS, uniqueItems=True, items={"type": "integer", "minimum": 0}),
        description=f"Positions to read (distinct, 0 .. seq-1); default: every position. At most {MAX_POSITIONS}.")
    target: Optional[TokenSpec] = Field(default=None, description=(
        "A token to follow: a string that is exactly one token (mind the leading space: ' Paris') "
        "or a token id."))
    top_k: StrictInt = Field(default=1, json_schema_extra={"minimum": 1, "maximum": TOP_K_MAX},
                             description=f"Top tokens per cell, 1 .. {TOP_K_MAX}.")
    lens: Literal["logit", "jacobian"] = lens_field()
    jlens: Optional[StrictStr] = jlens_field()


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


class LensResponse(LensAnswer):
    objective: Literal["next_token", "masked"] = Field(description=OBJECTIVE_DOC)
    tokens: list[str] = Field(description="Every token of the text (positions index into it).")
    positions: list[int]
    top: list[list[list[LensToken]]] = Field(description="[n_layers][positions][top_k], most probable first.")
    entropy: list[list[float]] = Field(description="[n_layers][positions], nats.")
    kl_to_final: list[list[float]] = Field(description="KL(final || layer) in nats, [n_layers][positions].")
    final: list[list[LensToken]] = Field(description="The model's own top_k (the last layer), [positions][top_k].")
    target: Optional[LensTarget]


def _target_at(ex: Explorer, text: Text, run: Run, position: int, target: int, how: Reading) -> TargetLens:
    """On the worker: the target's lens at `position`, caching the position's `Lens` from the
    same readout when it is not cached yet."""
    logits = fw.lens_logits(ex.bridge, run, position, how.transport)
    if ex.cache.get(how.key("lens", text, position)) is None:
        ex.cache.fill(how.key("lens", text, position), fw.lens_summary(logits))
    return target_lens(logits, target)


@operation("/lens", LensRequest, LensResponse,
           "Logit lens grid: every layer at every (or the given) position, with a target's trajectory.")
def lens(ex: Explorer, req: LensRequest) -> dict[str, Any]:
    text = req.source
    ids, strs = ex.tokens(text)
    seq = len(ids)
    positions = check_positions("positions", list(range(seq)) if req.positions is None else req.positions, seq)
    if len(positions) > MAX_POSITIONS:
        raise InvalidRequest(f"positions: at most {MAX_POSITIONS} positions per request, got {len(positions)} "
                             f"(the text has {seq} tokens; pass positions to read part of it)")
    top_k = check_top_k(req.top_k, TOP_K_MAX, int(ex.cfg.d_vocab))
    vocab = ex.vocab_strs
    target = None if req.target is None else token_id(ex, "target", req.target)
    how = reading(ex, req.lens, req.jlens)
    run = ex.run(text)

    def missing(p: int) -> bool:
        return ex.cache.get(how.key("lens", text, p)) is None or (
            target is not None and ex.cache.get(how.key("lens-target", text, p, target)) is None)

    def fill() -> None:
        """Every position not cached yet, in one piece of worker time: a request waits behind a
        running sweep's chunk once, not once per position."""
        for p in filter(missing, positions):
            if target is None:
                ex.cache.fill(how.key("lens", text, p), how.top_k(ex, run, p))
            else:  # the position's lens comes from the same readout
                ex.cache.fill(how.key("lens-target", text, p, target), _target_at(ex, text, run, p, target, how))

    if sum(map(missing, positions)) > 1:
        ex.call(fill)
    lenses: list[Lens] = []
    targets: list[TargetLens] = []
    for p in positions:
        if target is not None:
            targets.append(ex.cached(how.key("lens-target", text, p, target),
                                     lambda p=p: _target_at(ex, text, run, p, target, how)))
        lenses.append(lens_at(ex, text, run, p, how))

    def top(lens: Lens, layer: int) -> list[dict[str, Any]]:
        return [{"token": vocab[int(lens.ids[layer, j])], "token_id": int(lens.ids[layer, j]),
                 "probability": precision.probability(lens.probs[layer, j])} for j in range(top_k)]

    layers = range(int(ex.cfg.n_layers))
    return shape(
        LensResponse, **how.answer("lens" in req.model_fields_set), objective=objective(ex), tokens=list(strs), positions=positions,
        top=[[top(lens, l) for lens in lenses] for l in layers],
        entropy=[[precision.log_value(lens.entropy[l]) for lens in lenses] for l in layers],
        kl_to_final=[[precision.log_value(lens.kl_to_final[l]) for lens in lenses] for l in layers],
        final=[top(lens, -1) for lens in lenses],
        target=None if target is None else {
            "token": vocab[target], "token_id": target,
            "probability": [[precision.probability(t.probability[l]) for t in targets] for l in layers],
            "rank": [[int(t.rank[l]) for t in targets] for l in layers],
            "crossover_layer": [crossover_layer(t.rank) for t in targets],
        })
