"""The rounding policy, in one place: every number an answer carries is rounded here, by what it
is (API.md, "Numeric precision", lists each field).

- probabilities and perplexities: 6 significant digits (they span many orders of magnitude, and
  no small nonzero value may become 0);
- logits: 4 decimals;
- log-probabilities, entropies, KL divergences (nats) and attributions (logit units): 6 decimals;
- attention weights ("compact"): 4 significant digits of the cached float16 value;
- what a sweep computes in float32 (patching, tracing, ablation, attribution grids and their
  metrics) is returned as float32, serialized with the shortest decimal that reads back as the
  same float32; PCA coordinates as float64 likewise. Integers are exact.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ..math.forward import PATTERN_SCALE

ATTENTION_DIGITS = 4  # float16 holds ~3.3 significant digits, so the 4th adds at most 5e-4 relative
PROBABILITY_DIGITS = 6
LOGIT_DECIMALS = 4
LOG_DECIMALS = 6


def significant(value: float, digits: int) -> float:
    """`value` rounded to `digits` significant digits (small values keep their relative precision)."""
    return float(f"{value:.{digits}g}")


def probability(value: float) -> float:
    return significant(value, PROBABILITY_DIGITS)


def logit(value: float) -> float:
    return round(float(value), LOGIT_DECIMALS)


def log_value(value: float) -> float:
    """A log-probability, entropy, KL divergence or attribution."""
    return round(float(value), LOG_DECIMALS)


def log_values(values: Any) -> Any:
    """`log_value` of every element of an array (as nested lists; a 0-d array gives a float)."""
    return np.round(np.asarray(values, dtype=np.float64), LOG_DECIMALS).tolist()


@functools.cache
def _pattern_values() -> np.ndarray:
    """Every float16 bit pattern (as uint16) -> the weight it stores (/ PATTERN_SCALE) rounded to
    ATTENTION_DIGITS: [65536] float64. A table lookup instead of formatting millions of floats
    keeps a 1024-token layer's serialization fast."""
    with np.errstate(invalid="ignore"):  # the NaN bit patterns (never stored) stay NaN
        stored = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64) / PATTERN_SCALE
    return np.array([significant(v, ATTENTION_DIGITS) for v in stored])


def attention_weights(stored: torch.Tensor) -> np.ndarray:
    """Cached float16 patterns (weight * PATTERN_SCALE) -> the weights to ATTENTION_DIGITS (float64)."""
    return _pattern_values()[stored.cpu().view(torch.int16).numpy().view(np.uint16)]
