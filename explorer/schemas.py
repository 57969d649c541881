"""Request models: strict types (no `true`, `"3"` or `3.5` for an integer), unknown fields rejected.

The same models generate the OpenAPI document, so validation and documentation cannot drift.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .analysis import InvalidRequest


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextRequest(_Request):
    text: StrictStr = Field(description="Input text; BOS is prepended, so token index 0 is BOS.")


class TraceRequest(TextRequest):
    token_indices: Optional[list[StrictInt]] = Field(
        default=None, description="Token positions to trace (distinct); default: every token but BOS.")


class AttentionRequest(TextRequest):
    layer: StrictInt = Field(description="Layer, 0 .. n_layers-1.")
    head: Optional[StrictInt] = Field(
        default=None, description="Head, 0 .. n_heads-1; omitted or null: every head of the layer.")


class PredictRequest(TextRequest):
    token_index: StrictInt = Field(description="Position whose next-token predictions are read, 0 .. seq-1.")
    top_k: StrictInt = Field(default=5, description="Predictions per layer, 1 .. 100.")


_TYPE_WORDS = {
    "int_type": "an integer", "string_type": "a string", "list_type": "a list of integers",
    "int_from_float": "an integer", "dict_type": "an object",
}


def _field(loc: tuple[Any, ...]) -> str:
    name = ".".join(str(p) for p in loc if not isinstance(p, int))
    return name + ("[]" if any(isinstance(p, int) for p in loc) else "")


def parse(model: type[_Request], body: Any) -> Any:
    """Validate a decoded JSON body against `model`; raise `InvalidRequest` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = _field(err["loc"])
        kind = err["type"]
        if kind == "missing":
            raise InvalidRequest(f"{field} is required") from None
        if kind == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise InvalidRequest(f"unknown field {field!r}; allowed fields: {allowed}") from None
        if kind in _TYPE_WORDS:
            raise InvalidRequest(f"{field} must be {_TYPE_WORDS[kind]}") from None
        raise InvalidRequest(f"{field}: {err['msg']}") from None
