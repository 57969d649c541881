"""The OpenAPI 3 document, generated from the pydantic models in `schemas` plus the loaded
model's sizes (so `layer`'s maximum reads 11 for GPT-2 small and 2 for a 3-layer model)."""
from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from . import schemas
from .analysis import LENS_TOP_K_MAX

POSTS = {
    "/tokenize": (schemas.TextRequest, schemas.TokenizeResponse, "Token ids and strings (index 0 is BOS)."),
    "/trace": (schemas.TraceRequest, schemas.TraceResponse,
               "Residual-stream trajectories of tokens through every layer, in one shared 2D PCA."),
    "/attention": (schemas.AttentionRequest, schemas.AttentionResponse,
                   "Attention pattern of one head, or of every head of a layer."),
    "/predict": (schemas.PredictRequest, schemas.PredictResponse,
                 "Logit lens: top-k next-token predictions at every layer for one position."),
}
GETS = {
    "/health": (schemas.Health, "Liveness; answers at once even while the model is busy."),
    "/model": (schemas.ModelInfo, "The loaded model's name and sizes."),
}
ERRORS = {
    "400": "Invalid request: the error names the field and its allowed range.",
    "413": "Request body too large.",
    "415": "Content-Type is not application/json.",
    "503": "Model queue full; retry after the Retry-After header's seconds.",
}


def build(info: dict[str, Any], version: str = "1.0.0") -> dict[str, Any]:
    """The document for a model described by `info` (`LoadedModel.info()`)."""
    models = [m for m, _, _ in POSTS.values()] + [r for _, r, _ in POSTS.values()]
    models += [r for r, _ in GETS.values()] + [schemas.Error]
    _, defs = models_json_schema([(m, "validation") for m in models],
                                 ref_template="#/components/schemas/{model}")
    components = defs["$defs"]
    bounds = {
        "layer": (0, info["n_layers"] - 1), "head": (0, info["n_heads"] - 1),
        "token_index": (0, info["n_ctx"] - 1), "top_k": (1, LENS_TOP_K_MAX),
    }
    for model_name in ("TextRequest", "TraceRequest", "AttentionRequest", "PredictRequest"):
        for name, prop in components[model_name]["properties"].items():
            if name in bounds:
                target = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer"), prop)
                target["minimum"], target["maximum"] = bounds[name]
            if name == "token_indices":
                items = prop["anyOf"][0]["items"]
                items["minimum"], items["maximum"] = 0, info["n_ctx"] - 1
                prop["anyOf"][0].update(minItems=1, maxItems=info["n_ctx"], uniqueItems=True)

    def ref(model: type) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def responses(ok: type, codes: list[str]) -> dict[str, Any]:
        out = {"200": {"description": "OK", "content": {"application/json": {"schema": ref(ok)}}}}
        for code in codes:
            out[code] = {"description": ERRORS[code],
                         "content": {"application/json": {"schema": ref(schemas.Error)}}}
        return out

    paths: dict[str, Any] = {}
    for path, (req, resp, summary) in POSTS.items():
        paths[path] = {"post": {
            "operationId": path.strip("/"), "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(req)}}},
            "responses": responses(resp, list(ERRORS)),
        }}
    for path, (resp, summary) in GETS.items():
        paths[path] = {"get": {"operationId": path.strip("/"), "summary": summary,
                               "responses": responses(resp, [])}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Language model explorer API", "version": version,
                 "description": f"Serving {info['name']} ({info['weights']} weights): "
                                f"{info['n_layers']} layers, {info['n_heads']} heads, n_ctx {info['n_ctx']}."},
        "paths": paths,
        "components": {"schemas": components},
    }
