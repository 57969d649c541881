"""Request models: strict types (no `true`, `"3"` or `3.5` for an integer), unknown fields rejected.

The same models generate the OpenAPI document, so validation and documentation cannot drift.
"""
from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .analysis import InvalidRequest


# A token given by the user: a string that must be exactly one token, or a token id.
TokenSpec = Union[StrictStr, StrictInt]


class TokenRef(BaseModel):
    """A token named in an answer: its string and id."""

    token: str
    token_id: int


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=False)

    model: Optional[StrictStr] = Field(default=None, description=(
        "Name of a loaded model (GET /models); omitted or null: the server's default (first) model."))


class TextRequest(Request):
    text: StrictStr = Field(min_length=1, description=(
        "Input text. Where the model uses one (GET /model: prepends_bos), BOS is prepended, so index 0 "
        "is BOS; otherwise index 0 is the text's first token. BERT: [CLS] text [SEP]. At most n_ctx "
        "tokens, special tokens included."))


class TraceRequest(TextRequest):
    token_indices: Optional[list[StrictInt]] = Field(
        default=None, description=("Token positions to trace (distinct); default: the text's own tokens "
                                    "(not BOS, [CLS] or [SEP])."))


class AttentionRequest(TextRequest):
    layer: StrictInt = Field(description="Layer, 0 .. n_layers-1.")
    head: Optional[StrictInt] = Field(
        default=None, description="Head, 0 .. n_heads-1; omitted or null: every head of the layer.")
    precision: Literal["compact", "full"] = Field(default="compact", description=(
        '"compact" (default): each weight to 4 significant digits of the cached float16 value '
        '(relative error below 1e-3; a nonzero weight is never 0). "full": the float32 weights '
        "the model computes, recomputed for this layer (one forward pass up to the layer)."))


class PredictRequest(TextRequest):
    token_index: StrictInt = Field(description=(
        "Position read, 0 .. seq-1: its next-token predictions (causal), or the masked-LM reading of "
        "the token at it (an encoder)."))
    top_k: StrictInt = Field(default=5, description="Predictions per layer, 1 .. 100.")


# --- responses (documentation only: the OpenAPI document and its conformance tests use them) ---

class Token(BaseModel):
    index: int
    token_id: int
    token_str: str


class TokenizeResponse(BaseModel):
    tokens: list[Token]


class TraceToken(BaseModel):
    index: int
    token_str: str


class TracePoint(BaseModel):
    layer: int
    x: float
    y: float


class TraceResponse(BaseModel):
    tokens: list[TraceToken]
    trajectories: dict[str, list[TracePoint]] = Field(
        description="Token index (as a string) -> one 2D point per layer, in one shared PCA space.")
    token_indices: list[int]
    pca_explained_variance: list[float] = Field(min_length=2, max_length=2)


class AttentionResponse(BaseModel):
    attention_matrix: Union[list[list[float]], list[list[list[float]]]] = Field(description=(
        "[T][T] for one head (row i: how token i attends to each token j), or [n_heads][T][T] "
        "when head is omitted or null. precision \"compact\": 4 significant digits; \"full\": float32."))
    layer: int
    head: Optional[int]
    n_heads: int
    n_layers: int
    tokens: list[str]


class TopToken(BaseModel):
    token: str
    token_id: int
    probability: float
    logit: float


class LayerPredictions(BaseModel):
    layer: int
    top_tokens: list[TopToken]


OBJECTIVE_DOC = ('"next_token" (a causal model: what follows the token) or "masked" (an encoder such as '
                 'BERT: its masked-LM head\'s reading of the token at that position itself).')


class PredictResponse(BaseModel):
    token_index: int
    token_str: str
    objective: Literal["next_token", "masked"] = Field(description=OBJECTIVE_DOC)
    predictions_by_layer: list[LayerPredictions]


class ModelInfo(BaseModel):
    name: str
    family: str = Field(description=(
        "gpt2, gpt-neox, llama, qwen3, gemma2, gemma3 or bert; another architecture: its HF class name."))
    causal: bool = Field(description=(
        "true: a decoder (next-token predictions, triangular attention); false: an encoder (BERT), "
        "which the next-token endpoints refuse with 400."))
    n_layers: int
    n_heads: int = Field(description="Query heads per layer (attention patterns are per query head).")
    n_key_value_heads: int = Field(description="Key/value heads per layer; fewer than n_heads with grouped-query attention.")
    d_model: int
    d_vocab: int
    n_ctx: int
    weights: str = Field(description='"pretrained" (a hub model), "local" (a save_pretrained directory) or "random"')
    path: Optional[str] = Field(description='The directory the weights were read from with "local"; null otherwise.')
    device: str
    dtype: str
    prepends_bos: bool = Field(description=(
        "Whether index 0 is a start token the server adds (BOS; [CLS] for BERT). false: index 0 is "
        "the text's first token (Pythia, Qwen)."))
    bos_token_id: Optional[int] = Field(description="The id of that start token; null when none.")


class CacheStats(BaseModel):
    entries: int = Field(description="Cached items (forward passes, lens positions, trace projections).")
    bytes: int = Field(description="Bytes they hold; never above max_bytes.")
    max_bytes: int = Field(description="The bound (--cache-mb).")
    hits: int
    misses: int
    computations: int = Field(description="Items computed for requests (prefetch not counted).")


class ModelHealth(BaseModel):
    queue: int = Field(description="Requests waiting for this model's worker.")
    cache: CacheStats = Field(description="This model's cache; max_bytes is the bound all models share.")


class Health(BaseModel):
    status: str
    model: str = Field(description="The default model.")
    queue: int = Field(description="Model requests waiting for the (default model's) worker.")
    cache: CacheStats
    models: Optional[dict[str, ModelHealth]] = Field(default=None, description=(
        "Only when several models are loaded: each one's queue and cache, by name."))


class ModelsResponse(BaseModel):
    default: str = Field(description="The model used when a request names none.")
    models: list[ModelInfo]


class JobAccepted(BaseModel):
    job: str = Field(description="Job id: poll GET /jobs/{job}, cancel with DELETE /jobs/{job}.")


class JobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")

    job: str
    kind: str = Field(description="What the job computes (the endpoint that started it).")
    status: str = Field(description="queued | running | cancelling | done | error | cancelled")
    progress: float = Field(ge=0, le=1)
    result: Optional[dict[str, Any]] = Field(default=None, description="The endpoint's response, once done.")
    error: Optional[str] = None


class Error(BaseModel):
    error: str


_WORDS = {str: ("a string", "strings"), int: ("an integer", "integers"), float: ("a number", "numbers"),
          bool: ("true or false", "booleans"), dict: ("an object", "objects")}


def _words(tp: Any, plural: bool = False) -> str:
    """What a field's annotation accepts, in words: `Optional[list[StrictInt]]` -> "a list of integers"."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _words(args[0], plural)
    if origin in (Union, UnionType):
        return " or ".join(_words(a, plural) for a in args if a is not type(None))
    if origin is list:
        return "lists" if plural else f"a list of {_words(args[0], plural=True)}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return _WORDS.get(tp, (str(tp), str(tp)))[plural]


def _element(tp: Any) -> Any:
    """The element type of a (possibly optional) list annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _element(args[0])
    if origin in (Union, UnionType):
        return next(_element(a) for a in args if a is not type(None))
    return args[0] if origin is list else tp


def parse(model: type[Request], body: Any) -> Any:
    """Validate a decoded JSON body against `model`; raise `InvalidRequest` naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        name, kind = str(err["loc"][0]), err["type"]
        element = any(isinstance(p, int) for p in err["loc"])
        field = name + ("[]" if element else "")
        info = next((f for n, f in model.model_fields.items() if (f.alias or n) == name), None)
        if kind == "missing":
            raise InvalidRequest(f"{field} is required") from None
        if kind == "extra_forbidden" or info is None:
            allowed = ", ".join(f.alias or n for n, f in model.model_fields.items())
            raise InvalidRequest(f"unknown field {field!r}; allowed fields: {allowed}") from None
        if kind == "string_too_short":
            raise InvalidRequest(f"{field} must be a non-empty string") from None
        if kind.endswith("_type") or kind in ("int_from_float", "literal_error"):
            expected = _element(info.annotation) if element else info.annotation
            raise InvalidRequest(f"{field} must be {_words(expected)}") from None
        raise InvalidRequest(f"{field}: {err['msg']}") from None
