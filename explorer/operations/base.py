"""What every operation shares: the registry (path, request and response models, how it runs),
the request models' common fields and strict parsing, the response shaping, and the bounds and
token rules (checks, targets, prompt pairs) — each written once.

Request models are strict (no `true`, `"3"` or `3.5` for an integer) and reject unknown fields.
The same models generate the OpenAPI document, so validation and documentation cannot drift;
a response model is the shape `shape()` checks every answer against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, Union, get_args, get_origin

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..errors import InvalidRequest
from ..math.target import Target
from ..runtime import provenance
from ..session import Explorer, Text, TokenIds

# A token given by the user: a string that must be exactly one token, or a token id.
TokenSpec = Union[StrictStr, StrictInt]
SEED_MAX = 2**63 - 1
OBJECTIVE_DOC = ('"next_token" (a causal model: what follows the token) or "masked" (an encoder such as '
                 'BERT: its masked-LM head\'s reading of the token at that position itself).')


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    """One endpoint. `run(ex, request)` validates (InvalidRequest: 400) and then either answers
    (`mode` "call": the response dict) or returns the work as `Steps` (`mode` "steps": run
    synchronously, or as a job with `"async": true`; `mode` "job": always a job)."""

    path: str
    request: type["Request"]
    response: type[BaseModel]
    summary: str
    mode: Literal["call", "steps", "job"]
    run: Callable[[Explorer, Any], Any]
    response_bytes: Callable[[Explorer, Any], int] | None = None  # an estimate, for the size limit

    @property
    def kind(self) -> str:
        """The job kind and name of the operation: the path's last part (`/jobs/chg` -> chg)."""
        return self.path.rsplit("/", 1)[-1]

    def stamp(self, ex: Explorer, body: Any, request: "Request") -> dict[str, Any]:
        """The provenance of an answer to `body` (as received; `request` parsed from it), now."""
        return provenance.record(ex.describe(), self.path, body, request.seeds())


OPERATIONS: dict[str, Operation] = {}  # by path, in registration order


def operation(path: str, request: type["Request"], response: type[BaseModel], summary: str,
              mode: Literal["call", "steps", "job"] = "call",
              response_bytes: Callable[[Explorer, Any], int] | None = None) -> Callable[[Callable], Callable]:
    """Register the decorated `run(ex, request)` as the endpoint POST `path`: the route, the
    OpenAPI entry and sync/async handling all follow from this one registration."""
    def register(run: Callable[[Explorer, Any], Any]) -> Callable[[Explorer, Any], Any]:
        if path in OPERATIONS:
            raise ValueError(f"{path} is registered twice")
        OPERATIONS[path] = Operation(path, request, response, summary, mode, run, response_bytes)
        return run
    return register


def shape(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    """A response as JSON-ready fields, in `model`'s field order: every required field of the
    model must be given and no other (optional ones may be left out). Values are not converted
    (arrays stay arrays: the serializer writes them), so shaping costs no copy.

    The last line against silent nulls: a number or array of numbers that is not finite (JSON
    would carry it as null) fails the request with a 400 naming the field."""
    names = {(f.alias or n): f for n, f in model.model_fields.items()}
    unknown = fields.keys() - names.keys()
    missing = [n for n, f in names.items() if f.is_required() and n not in fields]
    if unknown or missing:
        raise TypeError(f"{model.__name__}: unknown fields {sorted(unknown)}, missing {missing}")
    for name, value in fields.items():
        bad = non_finite(value)
        if bad:
            raise InvalidRequest(f"the computation overflowed: {name} would hold {bad} non-finite value(s), "
                                 "which JSON cannot carry; the request's parameters are beyond what the "
                                 "model's number format holds")
    return {n: fields[n] for n in names if n in fields}


def non_finite(value: Any) -> int:
    """How many NaN or infinite numbers a float, an array or a (nested) list of floats holds."""
    if isinstance(value, (float, np.floating)):
        return int(not np.isfinite(value))
    if isinstance(value, list):
        try:
            value = np.asarray(value)  # nulls, strings or dicts make an object array: not checked
        except ValueError:  # ragged
            return 0
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return int(value.size - np.count_nonzero(np.isfinite(value)))
    return 0


# --- request models ---------------------------------------------------------------------------

class TokenRef(BaseModel):
    """A token named in an answer: its string and id."""

    token: str
    token_id: int


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=False)

    model: Optional[StrictStr] = Field(default=None, description=(
        "Name of a loaded model (GET /models); omitted or null: the server's default (first) model."))
    provenance: StrictBool = Field(default=False, description=(
        "true: the answer carries a `provenance` object (model and its source, software versions, this "
        "request, the seeds used, the time). A job's result always carries it."))

    def seeds(self) -> dict[str, int]:
        """The seeds this request runs with, defaults included (a provenance record's `seeds`)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name == "seed"}


class TextRequest(Request):
    text: Optional[StrictStr] = Field(default=None, min_length=1, description=(
        "Input text. Where the model uses one (GET /model: prepends_bos), BOS is prepended, so index 0 "
        "is BOS; otherwise index 0 is the text's first token. BERT: [CLS] text [SEP]. At most n_ctx "
        "tokens, special tokens included. Give text or token_ids."))
    token_ids: Optional[list[StrictInt]] = Field(default=None, description=(
        "The tokens instead of a text, taken as given: no BOS or other special token is added (e.g. "
        "/generate's token_ids, which start with the prompt's BOS). 1 .. n_ctx ids in the vocabulary."))

    @property
    def source(self) -> Text:
        return source_of(self.text, self.token_ids, "text", "token_ids")


def source_of(text: str | None, ids: Sequence[int] | None, text_field: str, ids_field: str) -> Text:
    """What a request is about: its text, or its token ids (a tuple: a cache key of its own);
    400 unless exactly one of the two fields is given."""
    if (text is None) == (ids is None):
        raise InvalidRequest(f"give either {text_field} or {ids_field}, not both and not neither")
    return text if text is not None else TokenIds(ids, ids_field)


# A text of a list: a string, or its token ids as given (a list of ints).
TextOrIds = Union[StrictStr, list[StrictInt]]


def as_texts(texts: Sequence[str | Sequence[int]]) -> list[Text]:
    """A list of texts with token-id lists as tuples (`Text`: a cache key of their own)."""
    return [t if isinstance(t, str) else tuple(t) for t in texts]


IDS_DOC = ("instead of {field}: its token ids, taken as given (no BOS or other special token is added), "
           "e.g. /generate's token_ids; 1 .. n_ctx ids in the vocabulary.")


class AsyncRequest(Request):
    run_async: StrictBool = Field(default=False, alias="async", description=(
        "true: answer 202 {job} at once and compute in the background (GET /jobs/{job})."))


class StreamRequest(AsyncRequest):
    stream: StrictBool = Field(default=False, description=(
        "true: answer text/event-stream: a `progress` event after every chunk of work as it happens "
        "(for /generate: every token), then a `result` event with the answer (or an `error` event)."))


class TargetFields(Request):
    """An answer token and an optional distractor (listed after the fields of the class it is mixed into)."""

    answer: TokenSpec = Field(description="The answer token: a string that is exactly one token "
                                          "(mind the leading space: ' Mary'), or a token id.")
    distractor: Optional[TokenSpec] = Field(default=None, description=(
        "A competing token (same form). With it the metric is logit[answer] - logit[distractor]; "
        "without it, log P(answer) (DLA: the answer's logit)."))


class TargetRequest(TargetFields, AsyncRequest):
    """A long request about a target."""


def in_branch(kind: str, **bounds: object) -> Callable[[dict], None]:
    """json_schema_extra adding `bounds` to the `kind` branch of an optional field's anyOf."""
    def extra(schema: dict) -> None:
        next(s for s in schema["anyOf"] if s.get("type") == kind).update(bounds)
    return extra


# --- admission by cost ------------------------------------------------------------------------

SYNC_SECONDS = 60.0  # a synchronous request estimated to take longer is refused: send "async": true
ASYNC_SECONDS = 3600.0  # a job estimated to take longer is refused


@dataclass(frozen=True)
class Cost:
    """What a long request is estimated to take before it starts: `work` (rows x positions x
    blocks on texts of `seq` tokens; `Explorer.seconds` turns it into time at the measured
    throughput) and `memory`, the largest working memory it needs at once beside the cache."""

    work: float
    seq: int
    memory: int


def admit(ex: Explorer, cost: Cost, run_async: bool, narrow: str, can_async: bool = True) -> None:
    """400 when a request's estimated memory exceeds the work budget, or its estimated time the
    bound of its kind (SYNC_SECONDS, or ASYNC_SECONDS for a job); `narrow` says how to shrink it
    (and, for an endpoint that `can_async`, the message offers `"async": true`)."""
    mib = 1 << 20
    if cost.memory > ex.work_bytes:
        raise InvalidRequest(
            f"this request needs about {cost.memory / mib:.0f} MiB of working memory at once, over the "
            f"server's work budget of {ex.work_bytes / mib:.0f} MiB (--work-mb); {narrow}")
    seconds = ex.seconds(cost.work, cost.seq)
    rate = f"{ex.throughput.rate / 1e9:.3g} GFLOP/s measured on this model"
    if run_async and seconds > ASYNC_SECONDS:
        raise InvalidRequest(f"this job would take about {seconds:.0f} s of model time ({rate}), over the "
                             f"{ASYNC_SECONDS:.0f} s a job may take; {narrow}")
    if not run_async and seconds > SYNC_SECONDS:
        offer = 'send "async": true to run it as a job (progress, cancel), or ' if can_async else ""
        raise InvalidRequest(f"this request would take about {seconds:.0f} s of model time ({rate}), over the "
                             f"{SYNC_SECONDS:.0f} s a synchronous request may take; {offer}{narrow}")


def forward_work(n_layers: int, seq: int) -> float:
    """The work of one forward pass: every position through every block."""
    return float(n_layers * seq)


def replay_work(n_layers: int, seq: int, rows_per_layer: int) -> float:
    """The work of replaying `rows_per_layer` rows from each layer l to the last (a sweep's cells)."""
    return float(rows_per_layer * seq * n_layers * (n_layers + 1) // 2)


# --- bounds -----------------------------------------------------------------------------------

def check_index(name: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise InvalidRequest(f"{name} must be between 0 and {size - 1}, got {value}")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InvalidRequest(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= SEED_MAX:
        raise InvalidRequest(f"seed must be between 0 and {SEED_MAX}, got {seed}")


def check_top_k(top_k: int, most: int, d_vocab: int) -> int:
    """`top_k` if in 1 .. most (400 otherwise), capped at the vocabulary size."""
    if not 1 <= top_k <= most:
        raise InvalidRequest(f"top_k must be between 1 and {most}, got {top_k}")
    return min(top_k, d_vocab)


def check_positions(name: str, positions: Sequence[int], seq: int) -> list[int]:
    """`positions` as a list, if non-empty, distinct and each in 0 .. seq-1; 400 naming `name` otherwise."""
    if not positions:
        raise InvalidRequest(f"{name} must not be empty")
    for i in positions:
        check_index(f"{name}[]", i, seq)
    if len(set(positions)) != len(positions):
        raise InvalidRequest(f"{name} must not contain duplicates")
    return list(positions)


def check_count(name: str, items: Sequence[Any], most: int, what: str = "texts") -> None:
    if not 1 <= len(items) <= most:
        raise InvalidRequest(f"{name} must hold between 1 and {most} {what}, got {len(items)}")


def each_text(ex: Explorer, name: str, texts: Sequence[Text],
              always_name: bool = True) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every text's tokens; an error names the text (`texts[2]: ...`), or with `always_name`
    False only when there are several."""
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(ex.tokens(text))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{name}[{i}]: {exc}" if always_name or len(texts) > 1 else str(exc)) from None
    return out


def require_causal(ex: Explorer, endpoint: str) -> None:
    """400 for endpoints whose metric is a next-token prediction when the model is an encoder."""
    if not ex.model.causal:
        raise InvalidRequest(
            f"model {ex.model.name!r} is an encoder ({ex.model.family}: bidirectional attention, "
            f"masked-token objective); {endpoint} needs a causal (next-token) model")


def objective(ex: Explorer) -> str:
    """What the lens reads at a position: the next token (causal), or the token at that
    position as a masked-LM head would fill it (an encoder)."""
    return "next_token" if ex.model.causal else "masked"


# --- tokens named by the user -----------------------------------------------------------------

def token_id(ex: Explorer, field: str, value: TokenSpec) -> int:
    """One vocabulary id from a string (exactly one token) or an id; 400 naming `field` otherwise."""
    d_vocab = int(ex.cfg.d_vocab)
    if isinstance(value, int):
        if not 0 <= value < d_vocab:
            raise InvalidRequest(f"{field} must be a token id between 0 and {d_vocab - 1}, got {value}")
        return value
    if not value:
        raise InvalidRequest(f"{field} must be a non-empty string or a token id")
    ids = ex.encode(value)
    if len(ids) != 1:
        pieces = ", ".join(repr(ex.vocab_strs[i]) for i in ids)
        raise InvalidRequest(f"{field} {value!r} is {len(ids)} tokens ({pieces}); it must be exactly one "
                             "token (mind the leading space: ' Paris' and 'Paris' differ) or a token id")
    return ids[0]


def parse_target(ex: Explorer, answer: TokenSpec, distractor: TokenSpec | None) -> Target:
    """The request's answer and distractor as a `Target` in this model's vocabulary."""
    a = token_id(ex, "answer", answer)
    d = None if distractor is None else token_id(ex, "distractor", distractor)
    if a == d:
        raise InvalidRequest(f"answer and distractor are the same token ({a}, {ex.vocab_strs[a]!r}); "
                             "the logit difference would be 0 everywhere")
    return Target(a, d)


def token_ref(ex: Explorer, i: int | None) -> dict[str, Any] | None:
    """A token as `{token, token_id}` (None stays None)."""
    return None if i is None else {"token": ex.vocab_strs[i], "token_id": i}


def describe_target(ex: Explorer, target: Target) -> dict[str, Any]:
    """`answer` and `distractor` fields of a response."""
    return {"answer": token_ref(ex, target.answer), "distractor": token_ref(ex, target.distractor)}


def check_same_length(ex: Explorer, clean: Text, corrupt: Text) -> None:
    """400 unless both prompts have the same number of tokens, naming both lengths and where they part."""
    (clean_ids, clean_strs), (corrupt_ids, corrupt_strs) = ex.tokens(clean), ex.tokens(corrupt)
    if len(clean_ids) == len(corrupt_ids):
        return
    first = next((i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b),
                 min(len(clean_ids), len(corrupt_ids)))

    def at(strs: Sequence[str]) -> str:
        return repr(strs[first]) if first < len(strs) else "(end)"
    raise InvalidRequest(
        f"clean and corrupt must have the same number of tokens: clean has {len(clean_ids)}, corrupt has "
        f"{len(corrupt_ids)} (special tokens included); they first differ at position {first} "
        f"(clean {at(clean_strs)}, corrupt {at(corrupt_strs)})")


# --- parsing ----------------------------------------------------------------------------------

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
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "objects" if plural else "an object"
    return _WORDS.get(tp, (str(tp), str(tp)))[plural]


def _models(tp: Any) -> list[type[BaseModel]]:
    """The models an annotation may hold (through Optional, Union, Annotated)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _models(args[0])
    if origin in (Union, UnionType):
        return [m for a in args for m in _models(a)]
    return [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _locate(model: type[BaseModel], loc: Sequence[Any]) -> tuple[str, Any, type[BaseModel]]:
    """Follow an error's location through the models: its path as the user wrote it
    (`steer[0].vector.positive`: list indices in brackets, a discriminated union's tag left out;
    an element of a list of plain values as `token_indices[]`), the annotation found there, and
    the model that holds the last field."""
    path, tp, holder = "", model, model
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            origin, args = get_origin(tp), get_args(tp)
            while origin in (Annotated, Union, UnionType):
                tp = next(a for a in args if a is not type(None))
                origin, args = get_origin(tp), get_args(tp)
            tp = args[0] if origin is list and args else tp
            continue
        members = _models(tp)
        if not members:  # a plain union's member label (`str`, `list[int]`): the field itself erred
            break
        tagged = [m for m in members if len(members) > 1 and m.model_fields.get("kind") is not None
                  and get_args(m.model_fields["kind"].annotation) == (part,)]
        if tagged:  # a discriminated union's tag: the member it chose, not a field
            tp = tagged[0]
            continue
        owner = next((m for m in members if part in {f.alias or n for n, f in m.model_fields.items()}), None)
        if owner is None:
            return (f"{path}.{part}" if path else str(part)), None, members[0] if members else holder
        holder = owner
        info = next(f for n, f in owner.model_fields.items() if (f.alias or n) == part)
        path, tp = (f"{path}.{part}" if path else str(part)), info.annotation
    return re.sub(r"\[\d+\]$", "[]", path), tp, holder


def parse(model: type[Request], body: Any) -> Any:
    """Validate a decoded JSON body against `model`; raise `InvalidRequest` naming the field
    (its path, for a field inside a list or an object: `steer[0].vector.values`)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        kind = err["type"]
        field, expected, holder = _locate(model, err["loc"])
        if kind == "missing":
            raise InvalidRequest(f"{field} is required") from None
        if kind == "extra_forbidden" or (expected is None and kind != "union_tag_invalid"):
            allowed = ", ".join(f.alias or n for n, f in holder.model_fields.items())
            raise InvalidRequest(f"unknown field {field!r}; allowed fields: {allowed}") from None
        if kind == "string_too_short":
            raise InvalidRequest(f"{field} must be a non-empty string") from None
        if kind.endswith("_type") or kind in ("int_from_float", "literal_error"):
            raise InvalidRequest(f"{field} must be {_words(expected)}") from None
        raise InvalidRequest(f"{field}: {err['msg']}") from None
