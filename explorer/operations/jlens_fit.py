"""POST /jobs/jlens_fit: fit a Jacobian lens on the given texts as a background job (TransformerLens'
`JacobianLens.fit`), save it under the lens directory (`--jlens-dir`) and make it available to
/lens and /predict at once.

The fit is the library's own (`runtime.jlens.fit`: its validation, drive loop and sums), so the
job's lens equals `JacobianLens.fit` on the same texts. It runs `in_turns` with the model worker,
one chunk per backward pass of the library's loop (the first of each text also runs the text's
forward pass): on a CPU a GPT-2-small text of 128 tokens takes minutes (bench/jlens_bench.py), so a
whole text per chunk would hold every other request and a cancel for that long. Between chunks
the fit's autograd graph stays alive while other requests use the model: they run without
gradients on the parameters, which the fit keeps frozen. One fit per model at a time (two would
each freeze and restore the same parameters' flags).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from typing import Any, Callable, Iterator, Optional

from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..errors import InvalidRequest, Overloaded
from ..math.replay import row_bytes
from ..math.steps import Steps, in_turns
from ..runtime import jlens
from ..session import Explorer
from .base import Cost, Request, admit, check_count, check_index, each_text, forward_work, operation, shape
from .predict import LensArtifact

MAX_TEXTS = 1000  # the published lenses use up to 1000 prompts
DEFAULT_MAX_SEQ_LEN = 128  # the library's default
_fitting: set[int] = set()  # the bridges (ids) with a fit running
_fitting_lock = threading.Lock()


class JlensFitRequest(Request):
    texts: list[StrictStr] = Field(description=(
        f"The corpus, 1 .. {MAX_TEXTS} texts, each tokenized as the model's own (BOS where it uses one) "
        "and long enough to leave positions after the first 16 (skipped) and before the last."))
    source_layers: Optional[list[StrictInt]] = Field(default=None, description=(
        "Layers to fit, distinct, 0 .. n_layers-2; default every one (the grid of /lens needs them all)."))
    max_seq_len: Optional[StrictInt] = Field(default=None, description=(
        f"Texts are cut to this many tokens, 18 .. n_ctx; default {DEFAULT_MAX_SEQ_LEN} (or n_ctx if smaller)."))
    name: StrictStr = Field(description=(
        "The lens's name (letters, digits, '.', '_', '-'; at most 64): /lens takes it as jlens, and it is "
        "saved as NAME.pt in the lens directory (--jlens-dir). Must not name a loaded lens or an existing file."))


class JlensFitResult(BaseModel):
    name: str
    path: str = Field(description="The saved artifact: start the server with --jlens PATH to load it again.")
    artifact: LensArtifact
    texts: int = Field(description="How many texts were fitted on.")


def busy(model: str) -> str:
    return (f"a Jacobian lens fit is already running for model {model!r}; wait for it to end or cancel it "
            "(DELETE /jobs/{id})")


@contextlib.contextmanager
def fitting(ex: Explorer) -> Iterator[None]:
    """Hold the model's one fit slot while a fit runs (a job that finds it taken ends with `busy`)."""
    with _fitting_lock:
        if id(ex.bridge) in _fitting:
            raise InvalidRequest(busy(ex.model.name))
        _fitting.add(id(ex.bridge))
    try:
        yield
    finally:
        with _fitting_lock:
            _fitting.discard(id(ex.bridge))


def corpus(texts: list[str]) -> str:
    """The artifact's corpus field: what it was fitted on, identified by a hash of the texts."""
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    return f"POST /jobs/jlens_fit: {len(texts)} texts, sha256 {digest}"


@operation("/jobs/jlens_fit", JlensFitRequest, JlensFitResult,
           "Fit a Jacobian lens on texts as a background job: 202 with its id; the job's result is a "
           "JlensFitResult, and the lens is usable by /lens at once.", mode="job")
def jlens_fit(ex: Explorer, req: JlensFitRequest) -> Steps:
    from transformer_lens.tools.analysis import JacobianLens
    from transformer_lens.tools.analysis.jacobian_lens import DEFAULT_SKIP_FIRST_POSITIONS as SKIP

    model = ex.model
    why = jlens.unusable(ex.bridge)
    if why is not None:
        raise InvalidRequest(f"model {model.name!r} cannot use a Jacobian lens: {why}")
    if not jlens.NAME.match(req.name):
        raise InvalidRequest(f"name must be 1 .. 64 letters, digits, '.', '_' or '-' (not first), got {req.name!r}")
    path = os.path.join(os.path.expanduser(ex.lens_dir), req.name + jlens.SUFFIX)
    if req.name in model.lenses or os.path.exists(path):
        raise InvalidRequest(f"name {req.name!r} is taken (a loaded lens, or {path} exists); choose another")
    check_count("texts", req.texts, MAX_TEXTS)
    n_layers = int(ex.cfg.n_layers)
    layers = None
    if req.source_layers is not None:
        check_count("source_layers", req.source_layers, n_layers - 1, "layers")
        for layer in req.source_layers:
            check_index("source_layers[]", layer, n_layers - 1)
        if len(set(req.source_layers)) != len(req.source_layers):
            raise InvalidRequest("source_layers must not contain duplicates")
        layers = sorted(req.source_layers)
    max_seq_len = min(DEFAULT_MAX_SEQ_LEN, ex.n_ctx) if req.max_seq_len is None else req.max_seq_len
    if not SKIP + 2 <= max_seq_len <= ex.n_ctx:
        raise InvalidRequest(f"max_seq_len must be between {SKIP + 2} and {ex.n_ctx} (n_ctx), got {max_seq_len}")
    lengths = [min(len(ids), max_seq_len) for ids, _ in each_text(ex, "texts", req.texts)]
    short = next((i for i, n in enumerate(lengths) if n < SKIP + 2), None)
    if short is not None:
        raise InvalidRequest(f"texts[{short}] is {lengths[short]} tokens; a fit reads the positions after the first "
                             f"{SKIP} and before the last, so each text needs at least {SKIP + 2} tokens")
    n_passes, longest = jlens.backward_passes(int(ex.cfg.d_model)), max(lengths)
    # per text: a forward pass of DIM_BATCH copies, then n_passes backward passes (each about two
    # forward passes) of them; autograd keeps every block's activations of the copies
    rows = jlens.DIM_BATCH * (1 + 2 * n_passes)
    admit(ex, Cost(rows * sum(forward_work(n_layers, n) for n in lengths), longest,
                   jlens.DIM_BATCH * n_layers * row_bytes(ex.cfg, longest)), True,
          "fit on fewer or shorter texts (max_seq_len)")
    if id(ex.bridge) in _fitting:  # answered now (503); `fitting` decides when the job starts
        raise Overloaded(busy(model.name), retry_after=30)
    fitted_on = corpus(req.texts)

    def fit(pause: Callable[[], None]) -> Any:
        return jlens.fit(ex.bridge, req.texts, corpus=fitted_on, source_layers=layers, max_seq_len=max_seq_len,
                         pause=pause)

    def steps() -> Steps:
        # One chunk per backward pass (the first of each text also runs its forward pass): a cancel
        # or another request waits for one pass, not for a whole text.
        with fitting(ex), contextlib.closing(in_turns(fit)) as turns:  # closed: the fit unwound
            passes = 0
            while True:
                try:
                    next(turns)
                except StopIteration as stop:
                    lens = stop.value
                    break
                yield {"progress": passes / (n_passes * len(req.texts)), "texts_done": passes // n_passes}
                passes += 1
        try:
            saved = jlens.save(lens, ex.lens_dir, req.name)
        except FileExistsError:
            raise InvalidRequest(f"name {req.name!r} was taken while the fit ran ({path} exists); nothing was "
                                 "loaded: fit again with another name") from None
        # served as --jlens will load it next time: from the saved (float16) file
        loaded = jlens.LoadedLens(req.name, JacobianLens.load(saved),
                                  {"kind": "file", "path": saved, "sha256": jlens.file_sha256(saved)})
        if model.lenses.setdefault(req.name, loaded) is not loaded:
            raise InvalidRequest(f"a lens named {req.name!r} was loaded while the fit ran; the fit is saved at {saved}")
        return shape(JlensFitResult, name=req.name, path=saved, artifact=loaded.info(), texts=len(req.texts))

    return steps()
