"""What a causal measurement scores, and how an effect is normalized.

- A target is an `answer` token and an optional `distractor` token (vocabulary ids; requests name
  them as strings or ids, `operations.base.parse_target`).
- The metric is read at the last position: `logit[answer] - logit[distractor]` with a
  distractor (`logit_diff`), else `log P(answer)` (`logprob`). Direct logit attribution is
  linear, so it uses the answer's raw logit (`logit`) where the others use the log-probability.
- Recovery (normalized effect) = (patched - corrupt) / (clean - corrupt): 0 = no effect,
  1 = the clean behaviour fully restored; `null` with a warning when clean == corrupt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RECOVERY_EPSILON = 1e-6  # |clean - corrupt| at or below this: recovery is undefined


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


def recovery(effect: np.ndarray, clean: float | np.float32, corrupt: float | np.float32) -> tuple[np.ndarray | None, str | None]:
    """(patched - corrupt) / (clean - corrupt) elementwise, or (None, warning) when undefined."""
    span = clean - corrupt
    if not np.isfinite(span) or abs(span) <= RECOVERY_EPSILON:
        return None, (f"clean and corrupt metrics are equal ({clean:.6g} vs {corrupt:.6g}): the prompts "
                      "do not differ in what the metric measures, so recovery is undefined (null); "
                      "the raw metric values are still reported")
    return ((effect - corrupt) / span).astype(np.float32), None
