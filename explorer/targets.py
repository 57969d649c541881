"""The rules every causal endpoint shares: targets, the metric, recovery, prompt pairs.

- A target is an `answer` token and an optional `distractor` token, each given as a string that
  must be exactly one token or as a vocabulary id.
- The metric is read at the last position: `logit[answer] - logit[distractor]` with a
  distractor (`logit_diff`), else `log P(answer)` (`logprob`). Direct logit attribution is
  linear, so it uses the answer's raw logit (`logit`) where the others use the log-probability.
- Recovery (normalized effect) = (patched - corrupt) / (clean - corrupt): 0 = no effect,
  1 = the clean behaviour fully restored; `null` with a warning when clean == corrupt.
- Clean and corrupt prompts must have the same number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

from .analysis import InvalidRequest

TokenSpec = Union[str, int]
RECOVERY_EPSILON = 1e-6  # |clean - corrupt| at or below this: recovery is undefined


def token_id(field: str, value: TokenSpec, encode: Callable[[str], list[int]],
             decode: Callable[[int], str], d_vocab: int) -> int:
    """One vocabulary id from a string (exactly one token) or an id; 400 naming `field` otherwise."""
    if isinstance(value, int):
        if not 0 <= value < d_vocab:
            raise InvalidRequest(f"{field} must be a token id between 0 and {d_vocab - 1}, got {value}")
        return value
    if not value:
        raise InvalidRequest(f"{field} must be a non-empty string or a token id")
    ids = encode(value)
    if len(ids) != 1:
        pieces = ", ".join(repr(decode(i)) for i in ids)
        raise InvalidRequest(f"{field} {value!r} is {len(ids)} tokens ({pieces}); it must be exactly one "
                             "token (mind the leading space: ' Paris' and 'Paris' differ) or a token id")
    return ids[0]


@dataclass(frozen=True)
class Target:
    """What a causal measurement scores: the answer token, and the distractor it competes with."""

    answer: int
    distractor: int | None = None

    @property
    def metric_name(self) -> str:
        return "logit_diff" if self.distractor is not None else "logprob"

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The metric of last-position logits [..., d_vocab] -> [...] (float32)."""
        logits = logits.float()
        if self.distractor is not None:
            return logits[..., self.answer] - logits[..., self.distractor]
        return logits.log_softmax(-1)[..., self.answer]

    def linear_metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The linear variant (direct logit attribution): the logit difference, or the answer's logit."""
        logits = logits.float()
        if self.distractor is not None:
            return logits[..., self.answer] - logits[..., self.distractor]
        return logits[..., self.answer]

    def direction(self, unembed: torch.Tensor) -> torch.Tensor:
        """The unembedding direction of the linear metric: unembed [d_model, d_vocab] -> [d_model]."""
        column = unembed[:, self.answer]
        return column - unembed[:, self.distractor] if self.distractor is not None else column

    def describe(self, token_str: Callable[[int], str]) -> dict[str, Any]:
        """`answer` and `distractor` as `{token, token_id}` (distractor null when absent)."""
        def one(i: int | None) -> dict[str, Any] | None:
            return None if i is None else {"token": token_str(i), "token_id": i}
        return {"answer": one(self.answer), "distractor": one(self.distractor)}


def parse_target(answer: TokenSpec, distractor: TokenSpec | None, encode: Callable[[str], list[int]],
                 decode: Callable[[int], str], d_vocab: int) -> Target:
    a = token_id("answer", answer, encode, decode, d_vocab)
    d = None if distractor is None else token_id("distractor", distractor, encode, decode, d_vocab)
    if a == d:
        raise InvalidRequest(f"answer and distractor are the same token ({a}, {decode(a)!r}); "
                             "the logit difference would be 0 everywhere")
    return Target(a, d)


def recovery(effect: np.ndarray, clean: float | np.float32, corrupt: float | np.float32) -> tuple[np.ndarray | None, str | None]:
    """(patched - corrupt) / (clean - corrupt) elementwise, or (None, warning) when undefined."""
    span = clean - corrupt
    if not np.isfinite(span) or abs(span) <= RECOVERY_EPSILON:
        return None, (f"clean and corrupt metrics are equal ({clean:.6g} vs {corrupt:.6g}): the prompts "
                      "do not differ in what the metric measures, so recovery is undefined (null); "
                      "the raw metric values are still reported")
    return ((effect - corrupt) / span).astype(np.float32), None


def check_same_length(clean: Sequence[int], corrupt: Sequence[int], clean_strs: Sequence[str],
                      corrupt_strs: Sequence[str]) -> None:
    """400 unless both prompts have the same number of tokens, naming both lengths and where they part."""
    if len(clean) == len(corrupt):
        return
    first = next((i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b), min(len(clean), len(corrupt)))
    def at(strs: Sequence[str]) -> str:
        return repr(strs[first]) if first < len(strs) else "(end)"
    raise InvalidRequest(
        f"clean and corrupt must have the same number of tokens: clean has {len(clean)}, corrupt has "
        f"{len(corrupt)} (special tokens included); they first differ at position {first} "
        f"(clean {at(clean_strs)}, corrupt {at(corrupt_strs)})")
