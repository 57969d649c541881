"""POST /ablate: ablate each head (or each layer's attention or MLP output) in turn, by its mean
over reference texts or by zeros, in one batched sweep (the patching cells of `math.patching`
with the ablation value as the source)."""
from __future__ import annotations

from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math import heads, patching
from ..math.replay import row_bytes
from ..math.steps import Steps, scaled
from ..session import Explorer
from .base import (IDS_DOC, Cost, TargetRequest, TextOrIds, as_texts, TokenRef, admit, check_count, describe_target, each_text, forward_work,
                   operation, parse_target, replay_work, require_causal, shape, source_of)

SITES = {"heads": "heads", "attn": "attn_out", "mlp": "mlp_out"}  # -> the patching site
MAX_REFERENCE_TEXTS = 64


class AblateRequest(TargetRequest):
    text: Optional[StrictStr] = Field(default=None, min_length=1, description=(
        "The prompt; the metric is read after its last token."))
    token_ids: Optional[list[StrictInt]] = Field(default=None, description=IDS_DOC.format(field="text"))
    method: Literal["mean", "zero"] = Field(default="mean", description=(
        "mean: replace the activation by its mean over every position of the reference texts; "
        "zero: by zeros."))
    reference_texts: Optional[list[TextOrIds]] = Field(default=None, description=(
        f"Texts whose positions the mean is taken over (method mean only), 1 .. {MAX_REFERENCE_TEXTS}, each a "
        "string or its token ids as given; default: the request's own text."))
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


@operation("/ablate", AblateRequest, AblateResponse,
           "Ablate each head (or layer's attention / MLP output) in turn, batched.", mode="steps")
def ablate(ex: Explorer, req: AblateRequest) -> Steps:
    target = parse_target(ex, req.answer, req.distractor)
    require_causal(ex, "POST /ablate")
    text = source_of(req.text, req.token_ids, "text", "token_ids")
    seq = len(ex.tokens(text)[0])
    if req.reference_texts is not None:
        if req.method != "mean":
            raise InvalidRequest("reference_texts applies only to method 'mean' (zero ablation uses no reference)")
        check_count("reference_texts", req.reference_texts, MAX_REFERENCE_TEXTS)
        each_text(ex, "reference_texts", as_texts(req.reference_texts))
    references = None if req.method == "zero" else as_texts(req.reference_texts or [text])
    n_layers = int(ex.cfg.n_layers)
    passes = forward_work(n_layers, seq) + sum(forward_work(n_layers, len(ex.tokens(t)[0])) for t in references or [])
    cells = replay_work(n_layers, seq, int(ex.cfg.n_heads) if req.site == "heads" else 1)
    admit(ex, Cost(passes + cells, seq, row_bytes(ex.cfg, seq)), req.run_async,
          "use a shorter text, or fewer or shorter reference_texts")

    def means() -> Steps:
        """Each site's mean over every position (BOS included) of every reference text, and the
        number of positions: one forward pass per text not cached yet, one text per chunk."""
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for i, text in enumerate(references or []):
            if i:
                yield i / len(references)
            count += heads.add_sums(sums, ex.acts(text))
        return {name: total / count for name, total in sums.items()}, count

    def steps() -> Steps:
        n_layers, n_heads = int(ex.cfg.n_layers), int(ex.cfg.n_heads)
        share = 0.0 if references is None else len(references) / (len(references) + 1)  # of the progress
        values, positions = None, None
        if references is not None:
            values, positions = yield from scaled(means(), 0.0, share)
        acts = ex.acts(text)
        baseline = np.float32(target.metric(patching.final_logits(ex.bridge, acts)).cpu())
        if req.site == "heads":
            cells = [patching.Cell(l, None, h) for l in range(n_layers) for h in range(n_heads)]
        else:
            cells = [patching.Cell(l) for l in range(n_layers)]
        sweep = patching.run_cells(ex.bridge, SITES[req.site], cells, acts, heads.everywhere(acts, values), target,
                                   ex.budget(seq))
        metric = yield from scaled(sweep, share, 1 - share)
        return shape(
            AblateResponse, site=req.site, method=req.method, metric=target.metric_name, baseline=baseline,
            effect=(metric - baseline).reshape((n_layers, n_heads) if req.site == "heads" else (n_layers,)),
            tokens=list(ex.tokens(text)[1]), **describe_target(ex, target),
            rows=[f"L{l}" for l in range(n_layers)],
            columns=[f"H{h}" for h in range(n_heads)] if req.site == "heads" else None,
            reference_texts=None if references is None else len(references), reference_positions=positions)

    return steps()
