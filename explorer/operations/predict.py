"""POST /predict: the logit lens at one position — top-k predictions after every layer — or the
Jacobian lens (`"lens": "jacobian"`), and the lens choice /lens shares: which lens reads a grid,
its cache keys and what an answer says about it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Literal, Optional

from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..errors import InvalidRequest
from ..math import forward as fw
from ..math.forward import LENS_TOP_K, Lens, Run
from ..runtime.jlens import LoadedLens, saved, unusable
from ..runtime.loading import ModelLoadError
from ..session import Explorer, Text, cache_key
from . import precision
from .base import OBJECTIVE_DOC, TextRequest, check_index, check_top_k, objective, operation, shape

# After a /predict, idle time computes the lens of this many positions nearest the asked one, so
# clicking through positions is served from cache. One position per idle job: a request waits
# for one lens projection at most.
PREFETCH_POSITIONS = 64


def lens_field() -> Any:
    return Field(default="logit", description=(
        'logit: each layer\'s residual stream read through the final norm and unembedding; jacobian: '
        'first mapped into the last block\'s output basis by a Jacobian lens (one fitted d_model x d_model '
        'matrix per layer; the last layer is read as it is). Every field is computed the same way for both.'))


def jlens_field() -> Any:
    return Field(default=None, description=(
        'With lens "jacobian": which loaded lens (GET /model: lenses[].name); default: the first listed.'))


class PredictRequest(TextRequest):
    token_index: StrictInt = Field(description=(
        "Position read, 0 .. seq-1: its next-token predictions (causal), or the masked-LM reading of "
        "the token at it (an encoder)."))
    top_k: StrictInt = Field(default=5, description=f"Predictions per layer, 1 .. {LENS_TOP_K}.")
    lens: Literal["logit", "jacobian"] = lens_field()
    jlens: Optional[StrictStr] = jlens_field()


class TopToken(BaseModel):
    token: str
    token_id: int
    probability: float
    logit: float


class LayerPredictions(BaseModel):
    layer: int
    top_tokens: list[TopToken]


class LensArtifact(BaseModel):
    """A Jacobian lens's provenance (as GET /model lists it)."""

    name: str
    source: dict[str, Any] = Field(description=(
        '{"kind": "file", "path", "sha256"} or {"kind": "hub", "repo", "filename", "revision"}.'))
    corpus: Optional[str] = Field(description="What it was fitted on, as recorded in the artifact.")
    n_prompts: int
    source_layers: list[int] = Field(description="The layers with a fitted matrix (every layer but the last).")
    model_name: Optional[str]
    model_revision: Optional[str]
    transformer_lens_version: Optional[str]
    max_seq_len: Optional[int]
    fit_dtype: Optional[str]


class LensAnswer(BaseModel):
    """What a lens answer says about its lens (only when the request names one)."""

    lens: Optional[Literal["logit", "jacobian"]] = Field(default=None, description=(
        "The lens that read the grid (present when the request gave `lens`)."))
    artifact: Optional[LensArtifact] = Field(default=None, description="With lens jacobian: the lens used.")


class PredictResponse(LensAnswer):
    token_index: int
    token_str: str
    objective: Literal["next_token", "masked"] = Field(description=OBJECTIVE_DOC)
    predictions_by_layer: list[LayerPredictions]


@dataclass(frozen=True)
class Reading:
    """Which lens reads a text's grid: the logit lens (`jl` None) or a loaded Jacobian lens."""

    jl: LoadedLens | None = None

    def key(self, kind: str, text: Text, *detail: Hashable) -> tuple[Hashable, ...]:
        """The cache key of an entry this lens reads (`lens`, `lens-target`; a Jacobian lens's are
        `jlens`, `jlens-target` with its name last)."""
        return cache_key(kind, text, *detail) if self.jl is None else cache_key("j" + kind, text, *detail, self.jl.name)

    @property
    def transport(self) -> Any:
        """The library's `JacobianLens.transport(residual, layer)`, or None (the logit lens)."""
        return None if self.jl is None else self.jl.lens.transport

    def top_k(self, ex: Explorer, run: Run, position: int) -> Lens:
        """On the worker: the `Lens` at `position` through this lens."""
        if self.jl is None:
            return fw.lens_top_k(ex.bridge, run, position)
        return fw.lens_top_k(ex.bridge, run, position, self.transport)

    def answer(self, asked: bool) -> dict[str, Any]:
        """The response's `lens` and `artifact` fields (none unless the request gave `lens`)."""
        if not asked:
            return {}
        return {"lens": "logit"} if self.jl is None else {"lens": "jacobian", "artifact": self.jl.info()}


def loaded_lens(ex: Explorer, jlens: str | None, field: str = "jlens") -> LoadedLens:
    """The Jacobian lens named `jlens` (None: the first loaded): a loaded one, or one saved under the
    lens directory for this model (loaded now, and kept); 400 when the model cannot use one, none
    is loaded, or the name is neither loaded nor saved."""
    model = ex.model
    why = unusable(ex.bridge)
    if why is not None:
        raise InvalidRequest(f"model {model.name!r} cannot use a Jacobian lens: {why}")
    if jlens is not None and jlens not in model.lenses:
        try:
            saved(model, ex.lens_dir, jlens)
        except ModelLoadError as exc:
            raise InvalidRequest(f"{field} {jlens!r}: {exc}") from None
    loaded = list(model.lenses)
    if not loaded:
        raise InvalidRequest(f"no Jacobian lens is loaded for model {model.name!r}: start the server with "
                             "--jlens SPEC (a lens file, a registry name, or auto), or fit one with POST /jobs/jlens_fit")
    name = loaded[0] if jlens is None else jlens
    if name not in model.lenses:
        raise InvalidRequest(f"{field} {jlens!r} is neither loaded nor saved for model {model.name!r}; loaded lenses: "
                             f"{', '.join(map(repr, loaded))} (GET /model: lenses, lenses_available)")
    return model.lenses[name]


def reading(ex: Explorer, lens: str, jlens: str | None) -> Reading:
    """The request's lens; 400 when a Jacobian lens cannot be had (`loaded_lens`) or lacks a layer."""
    if lens == "logit":
        if jlens is not None:
            raise InvalidRequest('jlens names a Jacobian lens; give it with lens: "jacobian"')
        return Reading()
    jl = loaded_lens(ex, jlens)
    n_layers = int(ex.cfg.n_layers)
    if not jl.covers(n_layers):
        raise InvalidRequest(f"jlens {jl.name!r} has matrices for layers {jl.lens.source_layers}; a lens grid reads "
                             f"every layer 0 .. {n_layers - 2} through it: fit one without source_layers")
    return Reading(jl)


def lens_at(ex: Explorer, text: Text, run: Run, position: int, how: Reading = Reading()) -> Lens:
    """The cached `Lens` of `text` (whose run is `run`) at `position` (shared with /lens)."""
    return ex.cached(how.key("lens", text, position), lambda: how.top_k(ex, run, position))


@operation("/predict", PredictRequest, PredictResponse,
           "Logit lens: top-k next-token predictions at every layer for one position (an encoder: "
           "the masked-LM head's reading of the token at it).")
def predict(ex: Explorer, req: PredictRequest) -> dict[str, Any]:
    ids, strs = ex.tokens(req.source)
    check_index("token_index", req.token_index, len(ids))
    top_k = check_top_k(req.top_k, LENS_TOP_K, int(ex.cfg.d_vocab))
    how = reading(ex, req.lens, req.jlens)
    lens = lens_at(ex, req.source, ex.run(req.source), req.token_index, how)
    _prefetch(ex, req.source, req.token_index, len(ids), how)
    vocab = ex.vocab_strs
    return shape(
        PredictResponse, **how.answer("lens" in req.model_fields_set), token_index=req.token_index,
        token_str=strs[req.token_index], objective=objective(ex),
        predictions_by_layer=[
            {"layer": layer, "top_tokens": [
                {"token": vocab[int(lens.ids[layer, j])], "token_id": int(lens.ids[layer, j]),
                 "probability": precision.probability(lens.probs[layer, j]),
                 "logit": precision.logit(lens.logits[layer, j])} for j in range(top_k)]}
            for layer in range(lens.probs.shape[0])])


def _prefetch(ex: Explorer, text: Text, position: int, seq: int, how: Reading = Reading()) -> None:
    """Queue idle-time lens computations for the positions nearest `position` not cached yet."""
    for p in sorted(range(seq), key=lambda p: (abs(p - position), p))[:PREFETCH_POSITIONS]:
        key = how.key("lens", text, p)
        if ex.cache.get(key) is None:
            ex.worker.submit_idle(key, lambda p=p, key=key: _fill(ex, text, p, key, how))


def _fill(ex: Explorer, text: Text, position: int, key: tuple, how: Reading) -> None:
    """Idle job: cache the lens at `position` unless it is there or the run was evicted."""
    run = ex.cache.get(cache_key("run", text))
    if run is not None and ex.cache.get(key) is None:
        ex.cache.fill(key, how.top_k(ex, run, position))
