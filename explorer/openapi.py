"""The OpenAPI 3 document, generated from the pydantic models in `schemas` plus the loaded
model's sizes (so `layer`'s maximum reads 11 for GPT-2 small and 2 for a 3-layer model).

Topic modules add their endpoints to `POSTS` (and to `ASYNC` when they accept `"async": true`).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import schemas
from .analysis import LENS_TOP_K_MAX

POSTS: dict[str, tuple[type[BaseModel], type[BaseModel], str]] = {
    "/tokenize": (schemas.TextRequest, schemas.TokenizeResponse,
                  "Token ids and strings (index 0 is BOS where GET /model's prepends_bos is true, else the "
                  "text's first token)."),
    "/trace": (schemas.TraceRequest, schemas.TraceResponse,
               "Residual-stream trajectories of tokens through every layer, in one shared 2D PCA."),
    "/attention": (schemas.AttentionRequest, schemas.AttentionResponse,
                   "Attention pattern of one head, or of every head of a layer."),
    "/predict": (schemas.PredictRequest, schemas.PredictResponse,
                 "Logit lens: top-k next-token predictions at every layer for one position (an encoder: "
                 "the masked-LM head's reading of the token at it)."),
}
ASYNC: set[str] = set()  # POST paths that answer 202 with a job id when the body has "async": true
JOB_POSTS: set[str] = set()  # POST paths that always start a job: 202 with its id, never 200
GETS: dict[str, tuple[type[BaseModel], str]] = {
    "/health": (schemas.Health, "Liveness; answers at once even while the model is busy."),
    "/model": (schemas.ModelInfo, "The default model's (or, with ?model=NAME, that model's) name, family, sizes and BOS convention."),
    "/models": (schemas.ModelsResponse, "Every loaded model; requests choose one with their `model` field."),
}
ERRORS = {
    "400": "Invalid request: the error names the field and its allowed range.",
    "404": "No such job (never existed, or forgotten after its time to live).",
    "413": "Request body too large.",
    "415": "Content-Type is not application/json.",
    "503": "Model queue full (or too many jobs running); retry after the Retry-After header's seconds.",
}
POST_ERRORS = ["400", "413", "415", "503"]


def _bounds(info: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {"layer": (0, info["n_layers"] - 1), "head": (0, info["n_heads"] - 1),
            "token_index": (0, info["n_ctx"] - 1), "top_k": (1, LENS_TOP_K_MAX)}


def _apply_bounds(component: dict[str, Any], info: dict[str, Any]) -> None:
    """Integer ranges that depend on the loaded model, on every request model's fields."""
    bounds = _bounds(info)
    for name, prop in component.get("properties", {}).items():
        if name in bounds and "maximum" not in prop:  # a field's own bounds (e.g. /lens's top_k) stay
            target = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer"), prop)
            target["minimum"], target["maximum"] = bounds[name]
        if name == "token_indices":
            items = prop["anyOf"][0]["items"]
            items["minimum"], items["maximum"] = 0, info["n_ctx"] - 1
            prop["anyOf"][0].update(minItems=1, maxItems=info["n_ctx"], uniqueItems=True)


def build(info: dict[str, Any], version: str = "1.1.0") -> dict[str, Any]:
    """The document for a model described by `info` (`LoadedModel.info()`)."""
    requests = [m for m, _, _ in POSTS.values()]
    models = requests + [r for _, r, _ in POSTS.values()] + [r for r, _ in GETS.values()]
    models += [schemas.Error, schemas.JobAccepted, schemas.JobStatus]
    _, defs = models_json_schema([(m, "validation") for m in dict.fromkeys(models)],
                                 ref_template="#/components/schemas/{model}")
    components = defs["$defs"]
    for model in requests:
        _apply_bounds(components[model.__name__], info)

    def ref(model: type) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def content(model: type) -> dict[str, Any]:
        return {"application/json": {"schema": ref(model)}}

    def responses(ok: type, codes: list[str], accepted: bool = False, job_only: bool = False) -> dict[str, Any]:
        out = {} if job_only else {"200": {"description": "OK", "content": content(ok)}}
        if accepted or job_only:
            out["202"] = {"description": "Accepted" + ("" if job_only else ' ("async": true)') + ": poll GET /jobs/{job}.",
                          "content": content(schemas.JobAccepted)}
        for code in codes:
            out[code] = {"description": ERRORS[code], "content": content(schemas.Error)}
        return out

    paths: dict[str, Any] = {}
    for path, (req, resp, summary) in POSTS.items():
        paths[path] = {"post": {
            "operationId": path.strip("/").replace("/", "_"), "summary": summary,
            "requestBody": {"required": True, "content": content(req)},
            "responses": responses(resp, POST_ERRORS, accepted=path in ASYNC, job_only=path in JOB_POSTS),
        }}
    for path, (resp, summary) in GETS.items():
        paths[path] = {"get": {"operationId": path.strip("/"), "summary": summary,
                               "responses": responses(resp, [])}}
    paths["/model"]["get"]["parameters"] = [{"name": "model", "in": "query", "required": False,
                                             "schema": {"type": "string"}, "description": "A loaded model's name."}]
    paths["/model"]["get"]["responses"] = responses(schemas.ModelInfo, ["400"])
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths["/jobs/{job_id}"] = {
        "get": {"operationId": "get_job", "summary": "A job's status, progress and (once done) result.",
                "parameters": job_id, "responses": responses(schemas.JobStatus, ["404"])},
        "delete": {"operationId": "cancel_job", "summary": "Cancel a job (it stops before its next chunk).",
                   "parameters": job_id, "responses": responses(schemas.JobStatus, ["404"])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Language model explorer API", "version": version,
                 "description": f"Serving {info['name']} ({info['weights']} weights): "
                                f"{info['n_layers']} layers, {info['n_heads']} heads, n_ctx {info['n_ctx']}."},
        "paths": paths,
        "components": {"schemas": components},
    }
