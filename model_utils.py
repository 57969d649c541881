"""Public facade for scripts and notebooks: load a model and ask it what the HTTP API answers.

    from model_utils import load_model, Explorer
    ex = Explorer(load_model("gpt2"))
    ex.add_sae(load_sae("jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre"))  # optional
    ex.predict("The cat sat on the mat", token_index=5, top_k=5)
    ex.patch(clean=..., corrupt=..., answer=" Mary", distractor=" John", site="heads")

`Explorer` has one method per endpoint, named after its path (`/jobs/chg` -> `chg`), taking the
request body's fields (positionally in the order API.md lists them, or by name) and returning
the response body as Python objects (arrays stay numpy). Long operations run to the end;
`ex.start(name, ...)` runs one as a job instead (`job.progress`, `job.cancel()`,
`job.done.result()`).
"""
from __future__ import annotations

from typing import Any, Callable

from explorer.errors import InvalidRequest, Overloaded
from explorer.math.forward import LENS_TOP_K, Run, forward, lens_top_k, pca_2d, trace_pca
from explorer.math.replay import Acts, capture, run_rows
from explorer.math.target import Target, recovery
from explorer.operations import OPERATIONS, Operation, parse
from explorer.runtime.engine import ByteLRU, ModelWorker, tune_allocator
from explorer.runtime.jobs import Job, JobManager, stamped
from explorer.runtime.loading import LoadedModel, ModelLoadError, gpt2_tokenizer, load_model, random_gpt2
from explorer.runtime.saes import SAE, load_sae, write_random_sae
from explorer.session import Explorer as Session
# Plotting (matplotlib is imported only when a plot function is called, never by the server).
from explorer.plots import (plot_attention_heatmap, plot_attribution_vs_patching, plot_causal_trace, plot_dla,
                            plot_head_grid, plot_lens_grid, plot_logit_lens, plot_patching, plot_target_trajectory,
                            plot_token_probabilities, plot_trajectories, project_2d)

NOT_POSITIONAL = ("model", "provenance", "async", "stream")  # fields only ever given by name (and every *_ids)


class Explorer(Session):
    """A model session with one method per endpoint (see the module doc)."""

    def __init__(self, model: LoadedModel, **options: Any) -> None:
        super().__init__(model, **options)
        self.jobs = JobManager()

    def _request(self, name: str, args: tuple[Any, ...], fields: dict[str, Any]) -> tuple[Operation, Any, dict]:
        op = next((o for o in OPERATIONS.values() if o.kind == name), None)
        if op is None:
            raise InvalidRequest(f"no operation {name!r}; operations: {', '.join(o.kind for o in OPERATIONS.values())}")
        names = [f.alias or n for n, f in op.request.model_fields.items()
                 if (f.alias or n) not in NOT_POSITIONAL and not n.endswith("_ids")]
        if len(args) > len(names):
            raise TypeError(f"{name}() takes at most {len(names)} positional arguments ({', '.join(names)})")
        body = {**dict(zip(names, args)), **fields}
        if op.mode == "steps":  # a Python caller may wait as long as it likes: a job's time bound applies
            body["async"] = True
        body = {k: v for k, v in body.items() if v is not None or k in fields}
        return op, parse(op.request, body), body

    def answer(self, name: str, /, *args: Any, **fields: Any) -> Any:
        """The response of operation `name` (the endpoint's path without its slash) to these fields;
        with `provenance=True` it carries its provenance, as over HTTP."""
        op, req, body = self._request(name, args, fields)
        result = op.run(self, req)
        if op.mode != "call":
            result = self.jobs.run(op.kind, result, self.worker)
        return {**result, "provenance": op.stamp(self, body, req)} if req.provenance else result

    def start(self, name: str, /, *args: Any, **fields: Any) -> Job:
        """Start a long operation (patch, causal_trace, ablate, attribution_patch, chg) as a job;
        its result carries its provenance, as a server's job does."""
        op, req, body = self._request(name, args, fields)
        if op.mode == "call":
            raise InvalidRequest(f"{name} answers at once; call ex.{name}(...)")
        return self.jobs.start(op.kind, stamped(op.run(self, req), lambda: op.stamp(self, body, req)), self.worker)


def _method(op: Operation) -> Callable[..., Any]:
    def method(self: Explorer, *args: Any, **fields: Any) -> Any:
        return self.answer(op.kind, *args, **fields)
    method.__name__ = op.kind
    method.__doc__ = f"POST {op.path}: {op.summary}"
    return method


for _op in OPERATIONS.values():
    setattr(Explorer, _op.kind, _method(_op))

__all__ = [
    "Acts", "ByteLRU", "Explorer", "InvalidRequest", "Job", "JobManager", "LENS_TOP_K", "LoadedModel",
    "ModelLoadError", "ModelWorker", "Overloaded", "Run", "Target", "capture", "forward", "gpt2_tokenizer",
    "lens_top_k", "load_model", "load_sae", "pca_2d", "random_gpt2", "SAE", "write_random_sae", "recovery", "run_rows", "trace_pca", "tune_allocator",
    "plot_attention_heatmap", "plot_attribution_vs_patching", "plot_causal_trace", "plot_dla", "plot_head_grid",
    "plot_lens_grid", "plot_logit_lens", "plot_patching", "plot_target_trajectory", "plot_token_probabilities",
    "plot_trajectories", "project_2d",
]
