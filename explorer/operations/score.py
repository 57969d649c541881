"""POST /score: token log-probabilities, perplexity and the next-token distribution at a
temperature, for 1-16 texts. Texts not cached yet run as right-padded batches
(`Explorer.runs`); their last layers are read out together."""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math.forward import LENS_TOP_K
from ..math.lens import READOUT_ROWS, Scores, batches, scores
from ..math.replay import row_bytes
from ..session import Explorer, Text, cache_key
from . import precision
from .base import (Cost, Request, TextOrIds, admit, as_texts, check_count, check_top_k, each_text, forward_work, in_branch, operation,
                   require_causal, shape)

MAX_TEXTS = 16
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-3, 1e3  # past these, softmax(logits / T) is one-hot or uniform anyway


class ScoreRequest(Request):
    texts: Optional[list[TextOrIds]] = Field(default=None, json_schema_extra=in_branch(
        "array", minItems=1, maxItems=MAX_TEXTS),
        description=f"1 .. {MAX_TEXTS} texts, run as one padded batch, each a string or its token ids as "
                    "given (a list of ints, no special token added); or give `text` or `token_ids`.")
    temperature: StrictFloat = Field(default=1.0, json_schema_extra={
        "minimum": TEMPERATURE_MIN, "maximum": TEMPERATURE_MAX},
        description="Temperature of `final` only (token_logprobs and perplexity are always at 1).")
    top_k: StrictInt = Field(default=5, description=f"Entries of `final`, 1 .. {LENS_TOP_K}.")
    text: Optional[StrictStr] = Field(default=None, min_length=1, description="One text (instead of `texts`).")
    token_ids: Optional[list[StrictInt]] = Field(default=None, description="One text's token ids, taken as given "
                                                                           "(instead of `texts`).")


class ScoreToken(BaseModel):
    token: str
    token_id: int
    logit: float
    logprob: float
    probability: float


class TextScore(BaseModel):
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[Optional[float]] = Field(description="log P(token | prefix); null for the first token.")
    perplexity: Optional[float] = Field(description="exp(-mean(token_logprobs)); null with no scored token.")
    final: list[ScoreToken] = Field(description="Next token after the last, at the temperature.")


class ScoreResponse(BaseModel):
    temperature: float
    results: list[TextScore]


def text_bytes(ex: Explorer, seq: int) -> int:
    """Memory scoring one text of `seq` tokens takes while its group runs: its run (then kept by
    the cache) and the forward pass's working rows."""
    cfg = ex.cfg
    return int(cfg.n_layers) * seq * (4 * int(cfg.d_model) + 2 * int(cfg.n_heads) * seq) + row_bytes(cfg, seq)


def readout_bytes(ex: Explorer) -> int:
    """The readout's logits and log-probabilities of READOUT_ROWS positions (float32)."""
    return 2 * 4 * READOUT_ROWS * int(ex.cfg.d_vocab)


def _scores(ex: Explorer, texts: Sequence[Text]) -> list[Scores]:
    """The cached `Scores` of `texts`. Those not cached yet are run and read out in groups whose
    memory (`text_bytes`) fits the work budget together; a group's runs are let go (to the
    cache's bound) before the next group runs."""
    missing = [t for t in dict.fromkeys(texts) if ex.cache.get(cache_key("score", t)) is None]
    sizes = [text_bytes(ex, len(ex.tokens(t)[0])) for t in missing]
    for group in batches(sizes, ex.work_bytes - readout_bytes(ex)):
        chosen = [missing[i] for i in group]
        runs = ex.runs(chosen)
        for text, s in zip(chosen, ex.call(functools.partial(scores, ex.bridge, runs))):
            ex.cache.fill(cache_key("score", text), s)
        del runs
    return [ex.cached(cache_key("score", t), lambda t=t: scores(ex.bridge, [ex.run(t)])[0]) for t in texts]


@operation("/score", ScoreRequest, ScoreResponse,
           "Token log-probabilities, perplexity and the next-token distribution of 1-16 texts.")
def score(ex: Explorer, req: ScoreRequest) -> dict[str, Any]:
    if sum(f is not None for f in (req.texts, req.text, req.token_ids)) != 1:
        raise InvalidRequest(f"give exactly one of text (one text), token_ids (one text's ids) and texts (a list "
                             f"of 1 .. {MAX_TEXTS} texts)")
    texts = as_texts(req.texts if req.texts is not None else [req.text if req.text is not None else req.token_ids])
    require_causal(ex, "POST /score")
    check_count("texts", texts, MAX_TEXTS)
    temperature = req.temperature
    if not TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX:
        raise InvalidRequest(f"temperature must be between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g} "
                             f"(> 0), got {temperature}")
    top_k = check_top_k(req.top_k, LENS_TOP_K, int(ex.cfg.d_vocab))
    tokens = each_text(ex, "texts", texts, always_name=False)
    longest = max(len(ids) for ids, _ in tokens)
    work = sum(forward_work(int(ex.cfg.n_layers), len(ids)) for ids, _ in tokens)
    admit(ex, Cost(work, longest, text_bytes(ex, longest) + readout_bytes(ex)), False, "send fewer or shorter texts",
          can_async=False)
    vocab = ex.vocab_strs
    results = []
    for s, (ids, strs) in zip(_scores(ex, texts), tokens):
        logprobs = [precision.log_value(v) for v in s.token_logprobs]
        logits = torch.from_numpy(s.final_logits).double()
        top = (logits / temperature).log_softmax(-1).topk(top_k)
        mean = np.mean(s.token_logprobs, dtype=np.float64) if logprobs else None
        results.append(shape(
            TextScore, tokens=list(strs), token_ids=list(ids), token_logprobs=[None, *logprobs],
            perplexity=None if mean is None else precision.probability(float(np.exp(-mean))),
            final=[{"token": vocab[i], "token_id": i, "logit": precision.logit(logits[i]),
                    "logprob": precision.log_value(lp), "probability": precision.probability(math.exp(lp))}
                   for lp, i in zip(top.values.tolist(), top.indices.tolist())]))
    return shape(ScoreResponse, temperature=temperature, results=results)
