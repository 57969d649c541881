"""The operations floor: one module per endpoint, each registering itself (`base.operation`) with
its request and response models, validation, bounds, cache keys and steps. Importing this
package registers them all; `OPERATIONS` lists them by path."""
# In the order the API documents them (the OpenAPI document lists paths in registration order).
from . import (tokenize, trace, attention, predict, patch, causal_trace, ablate, attribution_patch,  # noqa: F401
               chg, lens, score, dla, generate, steering_vector, features, feature, jlens_fit)
from .base import OPERATIONS, Operation, parse

__all__ = ["OPERATIONS", "Operation", "parse"]
