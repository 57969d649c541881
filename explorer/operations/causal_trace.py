"""POST /causal_trace: ROME-style causal tracing of a fact through a noised subject
(`math.tracing`)."""
from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math import tracing
from ..math.replay import row_bytes
from ..math.patching import final_logits
from ..math.steps import Steps
from ..math.target import recovery
from ..session import Explorer, Text, cache_key
from .base import (IDS_DOC, AsyncRequest, Cost, TokenRef, TokenSpec, admit, check_index, check_seed, forward_work, operation,
                   replay_work, require_causal, shape, source_of, token_id, token_ref)

DEFAULT_SAMPLES = 10
MAX_SAMPLES = 50
DEFAULT_WINDOW = 10  # ROME's
NOISE_SCALE = 3.0  # default noise = NOISE_SCALE x the standard deviation of the token embeddings
NOISE_TAILS = 8.0  # a draw's largest entries, in standard deviations, with a margin


class CausalTraceRequest(AsyncRequest):
    text: Optional[StrictStr] = Field(default=None, min_length=1, description=(
        "The prompt, e.g. 'The Eiffel Tower is in the city of'."))
    token_ids: Optional[list[StrictInt]] = Field(default=None, description=IDS_DOC.format(field="text") + (
        " A subject string is then found in the tokens' decoded strings, joined."))
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
        "standard deviation of the model's token embeddings. Above 0 and at most sqrt(the dtype's largest "
        "value / d_model) / 8 (8.3e16 for GPT-2 small in float32): larger noise overflows the norms."))
    samples: StrictInt = Field(default=DEFAULT_SAMPLES, description=f"Noise draws averaged per cell, 1 .. {MAX_SAMPLES}.")
    seed: StrictInt = Field(default=0, description="Seed of the noise draws; the same seed gives the same answer.")
    window: Optional[StrictInt] = Field(default=None, description=(
        "Layers restored together for mlp/attn, 1 .. n_layers, clipped at the first and last layer; "
        f"default {DEFAULT_WINDOW} (ROME's), or n_layers if smaller."))

    @property
    def source(self) -> Text:
        return source_of(self.text, self.token_ids, "text", "token_ids")


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


def max_noise(ex: Explorer) -> float:
    """The largest noise the model's dtype carries: a norm squares and sums the d_model entries of
    a noised embedding, whose largest entries reach about NOISE_TAILS standard deviations, so
    d_model * (NOISE_TAILS * noise)^2 must stay below the dtype's largest value."""
    return math.sqrt(torch.finfo(ex.cfg.dtype).max / int(ex.cfg.d_model)) / NOISE_TAILS


def subject_positions(ex: Explorer, text: Text, subject: str | Sequence[int]) -> list[int]:
    """Token positions of the subject: a substring of `text` (every token overlapping it; for
    token ids, of their decoded strings joined), or a list of positions. 400 if absent,
    ambiguous, empty or out of range."""
    ids, strs = ex.tokens(text)
    if not isinstance(subject, str):
        if not subject:
            raise InvalidRequest("subject must not be an empty list")
        for p in subject:
            check_index("subject[]", p, len(ids))
        if len(set(subject)) != len(subject):
            raise InvalidRequest("subject must not contain duplicate positions")
        return sorted(subject)
    if not subject:
        raise InvalidRequest("subject must be a non-empty substring of text or a list of token positions")
    if isinstance(text, tuple):  # each token's span in its decoded strings, joined
        ends = list(itertools.accumulate(len(s) for s in strs))
        offsets, written = list(zip([0] + ends[:-1], ends)), "".join(strs)
    else:
        offsets, written = ex.offsets(text), text
    found = written.count(subject)
    if found != 1:
        raise InvalidRequest(f"subject {subject!r} occurs {found} times in text; it must occur exactly "
                             "once, or give its token positions as a list")
    begin = written.index(subject)
    end = begin + len(subject)
    first = len(ids) - len(offsets)  # BOS, when the model prepends one to a text
    return [first + i for i, (a, b) in enumerate(offsets) if a < end and b > begin]


@operation("/causal_trace", CausalTraceRequest, CausalTraceResponse,
           "ROME-style causal tracing: restore clean states into noise-corrupted runs.", mode="steps")
def causal_trace(ex: Explorer, req: CausalTraceRequest) -> Steps:
    require_causal(ex, "POST /causal_trace")
    if not 1 <= req.samples <= MAX_SAMPLES:
        raise InvalidRequest(f"samples must be between 1 and {MAX_SAMPLES}, got {req.samples}")
    n_layers = int(ex.cfg.n_layers)
    window = min(DEFAULT_WINDOW, n_layers) if req.window is None else req.window
    if not 1 <= window <= n_layers:
        raise InvalidRequest(f"window must be between 1 and {n_layers} (n_layers), got {window}")
    if req.noise is not None and not (np.isfinite(req.noise) and 0 < req.noise <= max_noise(ex)):
        raise InvalidRequest(f"noise must be a positive number at most {max_noise(ex):.3g} (beyond it the norms, "
                             f"which square the noised embeddings, overflow {ex.model.dtype}), got {req.noise}")
    check_seed(req.seed)
    positions = subject_positions(ex, req.source, req.subject)
    answer = None if req.answer is None else token_id(ex, "answer", req.answer)
    admit(ex, cost(ex, req, positions[0]), req.run_async, "use fewer samples or a shorter text")
    return _steps(ex, req, positions, answer, window)


def cost(ex: Explorer, req: CausalTraceRequest, first: int) -> Cost:
    """The clean and noisy runs, and `samples` rows per cell from the first subject position on;
    the noisy runs (every block's input) are kept throughout beside one chunk's rows."""
    seq, n_layers = len(ex.tokens(req.source)[0]), int(ex.cfg.n_layers)
    passes = forward_work(n_layers, seq) * (1 + req.samples)
    cells = replay_work(n_layers, seq, req.samples * (seq - first))
    return Cost(passes + cells, seq, noisy_bytes(ex, seq, req.samples) + req.samples * row_bytes(ex.cfg, seq))


def noisy_bytes(ex: Explorer, seq: int, samples: int) -> int:
    """The noisy runs' residual streams: every block's input, each sample, float32."""
    return 4 * (int(ex.cfg.n_layers) + 1) * samples * seq * int(ex.cfg.d_model)


def _steps(ex: Explorer, req: CausalTraceRequest, positions: list[int], answer: int | None, window: int) -> Steps:
    bridge = ex.bridge
    clean = ex.acts(req.source)
    clean_probs = final_logits(bridge, clean).float().softmax(-1)
    if answer is None:
        answer = int(clean_probs.argmax())
    scale = NOISE_SCALE * tracing.embedding_std(bridge) if req.noise is None else float(req.noise)
    seq = len(clean.token_ids)
    budget = ex.budget(seq, reserved=noisy_bytes(ex, seq, req.samples))
    key = cache_key("noisy", tuple(clean.token_ids.tolist()), tuple(positions), scale, req.samples, req.seed)
    noisy = ex.cache.get(key)
    if noisy is None:
        noisy = yield from tracing.noisy_states(bridge, clean, positions, scale, req.samples, req.seed, budget)
        ex.cache.fill(key, noisy)
    # float32 like the scores, so a cell equal to a probability serializes identically
    clean_prob = np.float32(clean_probs[answer].cpu())
    corrupt_prob = tracing.corrupt_probability(bridge, noisy, answer)
    scores = yield from tracing.trace_scores(bridge, clean, noisy, answer, req.kind, positions[0], window, corrupt_prob,
                                             budget)
    rec, warning = recovery(scores, clean_prob, corrupt_prob)
    fields: dict[str, Any] = dict(
        tokens=list(ex.tokens(req.source)[1]), subject_positions=positions, kind=req.kind,
        answer=token_ref(ex, answer), clean_prob=clean_prob, corrupt_prob=corrupt_prob, scores=scores, recovery=rec,
        noise=scale, samples=req.samples, seed=req.seed, window=window if req.kind != "resid" else None)
    if warning:
        fields["warning"] = warning
    return shape(CausalTraceResponse, **fields)
