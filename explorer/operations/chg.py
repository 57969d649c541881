"""POST /jobs/chg: causal head gating (Nam et al., NeurIPS 2025) as a background job — a learned
gate per head and each head's role (`math.chg`)."""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field, StrictInt

from ..errors import InvalidRequest
from ..math import chg as gating
from ..math.replay import row_bytes
from ..math.steps import Steps
from ..session import Explorer
from .base import (Cost, Request, TextOrIds, TokenRef, TokenSpec, admit, as_texts, check_count, check_seed, each_text, forward_work,
                   operation, require_causal, shape, token_id, token_ref)

DEFAULT_STEPS = 100
MAX_STEPS = 1000
DEFAULT_LR = 0.5
MAX_LR = 10.0
DEFAULT_LAMBDA = 0.1
MAX_LAMBDA = 10.0
MAX_TEXTS = 64


class ChgRequest(Request):
    texts: list[TextOrIds] = Field(description=(
        f"The task's prompts, 1 .. {MAX_TEXTS}, each a string or its token ids as given (a list of ints)."))
    targets: list[TokenSpec] = Field(description=(
        "One answer per text: a string that is exactly one token (mind the leading space), or a token id."))
    steps: StrictInt = Field(default=DEFAULT_STEPS, description=(
        f"Adam updates per stage (three stages), 1 .. {MAX_STEPS}."))
    lr: float = Field(default=DEFAULT_LR, description=f"Adam learning rate on the gate logits, (0, {MAX_LR}].")
    lam: float = Field(default=DEFAULT_LAMBDA, alias="lambda", description=(
        f"Strength of the pressure in stages 2 and 3, 0 .. {MAX_LAMBDA}: the penalty's gradient "
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


@operation("/jobs/chg", ChgRequest, ChgResult,
           "Causal head gating as a background job: 202 with its id; the job's result is a ChgResult.", mode="job")
def chg(ex: Explorer, req: ChgRequest) -> Steps:
    require_causal(ex, "POST /jobs/chg")
    check_count("texts", req.texts, MAX_TEXTS)
    if len(req.targets) != len(req.texts):
        raise InvalidRequest(f"targets must hold one answer per text: {len(req.texts)} texts, {len(req.targets)} targets")
    if not 1 <= req.steps <= MAX_STEPS:
        raise InvalidRequest(f"steps must be between 1 and {MAX_STEPS}, got {req.steps}")
    if not (np.isfinite(req.lr) and 0 < req.lr <= MAX_LR):
        raise InvalidRequest(f"lr must be a number above 0 and at most {MAX_LR}, got {req.lr}")
    if not (np.isfinite(req.lam) and 0 <= req.lam <= MAX_LAMBDA):
        raise InvalidRequest(f"lambda must be between 0 and {MAX_LAMBDA}, got {req.lam}")
    check_seed(req.seed)
    ids = [ids for ids, _ in each_text(ex, "texts", as_texts(req.texts))]
    answers = [token_id(ex, f"targets[{i}]", t) for i, t in enumerate(req.targets)]
    n_layers, longest = int(ex.cfg.n_layers), max(map(len, ids))
    # per step and stage a forward and backward pass over every text (about three forward passes)
    work = 3 * (1 + 3 * (req.steps + 1)) * sum(forward_work(n_layers, len(i)) for i in ids)
    admit(ex, Cost(work, longest, n_layers * row_bytes(ex.cfg, longest)), True,
          "use fewer steps, or fewer or shorter texts")
    budget = ex.budget(longest)

    def steps() -> Steps:
        result: dict[str, Any] = yield from gating.train(ex.bridge, ids, answers, req.steps, req.lr, req.lam, req.seed,
                                                         budget)
        return shape(ChgResult, **result, targets=[token_ref(ex, a) for a in answers])

    return steps()
