"""The OpenAPI 3 document, generated from the registered operations' models plus the loaded
model's sizes (so `layer`'s maximum reads 11 for GPT-2 small and 2 for a 3-layer model), and
the models of the GET endpoints and errors.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..math.forward import LENS_TOP_K
from ..operations import OPERATIONS
from ..operations.base import StreamRequest
from ..operations.features import SaeInfo
from ..operations.predict import LensArtifact


class ModelProvenance(BaseModel):
    name: str
    source: dict[str, Any] = Field(description=(
        'Where the weights came from. {"kind": "hub", "id", "revision": the commit of the files loaded, '
        '"requested_revision"}; {"kind": "local", "path", "sha256": one hash over the directory\'s config, '
        'tokenizer and weight files, "files"}; {"kind": "random", "seed", "shape", "tokenizer"}.'))
    family: str
    dtype: str
    device: str = Field(description='Where it computes; with a device map, every place in order ("cuda:0+cpu").')
    device_map: Optional[Any] = Field(description="The --device-map it was placed with; null: none.")


class Software(BaseModel):
    python: str
    torch: Optional[str]
    transformers: Optional[str]
    transformer_lens: Optional[str]
    explorer: dict[str, Any] = Field(description=(
        '{"version": the package version, "commit": the git commit when run from a checkout (else null), '
        '"modified": whether tracked files differ from that commit}'))


class StaticProvenance(BaseModel):
    model: ModelProvenance
    software: Software


class Provenance(StaticProvenance):
    """Where an answer came from: in every job's result, and in a response whose request said
    `"provenance": true`."""

    endpoint: str = Field(description="The path the request was sent to.")
    request: dict[str, Any] = Field(description="The request body as received.")
    seeds: dict[str, int] = Field(description="The seeds used, defaults included ({} when none).")
    time: str = Field(description="When the answer was made: ISO 8601, UTC.")


class AvailableLens(BaseModel):
    kind: Literal["hub", "file"] = Field(description=(
        '"hub": the lens registry\'s published lens for the model; "file": a lens saved under the lens directory.'))
    spec: str = Field(description="What --jlens takes to load it at start-up.")
    name: str = Field(description='Its name once loaded ("file": the name jlens takes).')
    cached: bool = Field(description='Whether it loads without the network ("hub": in the Hugging Face cache).')
    loaded: bool = Field(description="Whether it is loaded now (listed in lenses).")
    repo: Optional[str] = None
    filename: Optional[str] = None
    revision: Optional[str] = None
    corpus: Optional[str] = None
    n_prompts: Optional[int] = None


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
    lenses: list[LensArtifact] = Field(description=(
        'The Jacobian lenses loaded for the model (--jlens, POST /jobs/jlens_fit), in order: /lens and '
        '/predict read through one with "lens": "jacobian" ("jlens": its name; default the first).'))
    lenses_available: list[AvailableLens] = Field(description=(
        "The Jacobian lenses this model can use, loaded or not: the lens registry's for its hub id, and the "
        "lenses saved under the lens directory (--jlens-dir) for it, which jlens can name directly."))
    provenance: StaticProvenance = Field(description=(
        "The part of every answer's provenance that this model fixes: its source and the software."))
    saes: list[SaeInfo] = Field(description="The sparse autoencoders served on this model (--sae).")


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


class SaesResponse(BaseModel):
    saes: list[SaeInfo] = Field(description="Every loaded SAE, each naming its model.")


class Error(BaseModel):
    error: str


GETS: dict[str, tuple[type[BaseModel], str]] = {
    "/health": (Health, "Liveness; answers at once even while the model is busy."),
    "/model": (ModelInfo, "The default model's (or, with ?model=NAME, that model's) name, family, sizes and BOS convention."),
    "/models": (ModelsResponse, "Every loaded model; requests choose one with their `model` field."),
    "/saes": (SaesResponse, "Every loaded sparse autoencoder: name, model, hook, layer, d_sae, architecture, source."),
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
            "token_index": (0, info["n_ctx"] - 1), "top_k": (1, LENS_TOP_K)}


def _apply_bounds(component: dict[str, Any], info: dict[str, Any]) -> None:
    """Integer ranges that depend on the loaded model, on every request model's fields."""
    bounds = _bounds(info)
    for name, prop in component.get("properties", {}).items():
        if name in bounds and "maximum" not in prop:  # a field's own bounds (e.g. /lens's top_k) stay
            target = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer"), prop)
            target["minimum"], target["maximum"] = bounds[name]
        if name == "sae" and info.get("saes"):  # the loaded SAEs' names (a fuzzer then reaches the SAE code)
            prop["enum"] = [sae["name"] for sae in info["saes"]]
        if name == "token_indices":
            items = prop["anyOf"][0]["items"]
            items["minimum"], items["maximum"] = 0, info["n_ctx"] - 1
            prop["anyOf"][0].update(minItems=1, maxItems=info["n_ctx"], uniqueItems=True)


def build(info: dict[str, Any], version: str = __version__) -> dict[str, Any]:
    """The document for a model described by `info` (`Explorer.info()`)."""
    requests = [op.request for op in OPERATIONS.values()]
    models = requests + [op.response for op in OPERATIONS.values()] + [r for r, _ in GETS.values()]
    models += [Error, JobAccepted, JobStatus, Provenance]
    _, defs = models_json_schema([(m, "validation") for m in dict.fromkeys(models)],
                                 ref_template="#/components/schemas/{model}")
    components = defs["$defs"]
    for model in requests:
        _apply_bounds(components[model.__name__], info)
    for op in OPERATIONS.values():  # added by the web layer, not the operation: see Provenance
        components[op.response.__name__]["properties"]["provenance"] = {"$ref": "#/components/schemas/Provenance"}

    def ref(model: type) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def content(model: type) -> dict[str, Any]:
        return {"application/json": {"schema": ref(model)}}

    def responses(ok: type, codes: list[str], accepted: bool = False, job_only: bool = False) -> dict[str, Any]:
        out = {} if job_only else {"200": {"description": "OK", "content": content(ok)}}
        if accepted or job_only:
            out["202"] = {"description": "Accepted" + ("" if job_only else ' ("async": true)') + ": poll GET /jobs/{job}.",
                          "content": content(JobAccepted)}
        for code in codes:
            out[code] = {"description": ERRORS[code], "content": content(Error)}
        return out

    paths: dict[str, Any] = {}
    for path, op in OPERATIONS.items():
        paths[path] = {"post": {
            "operationId": path.strip("/").replace("/", "_"), "summary": op.summary,
            "requestBody": {"required": True, "content": content(op.request)},
            "responses": responses(op.response, POST_ERRORS, accepted=op.mode == "steps", job_only=op.mode == "job"),
        }}
        if issubclass(op.request, StreamRequest):  # "stream": true
            paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"schema": {
                "type": "string", "description": "event: progress / result / error, each with one line of JSON data"}}
    for path, (resp, summary) in GETS.items():
        paths[path] = {"get": {"operationId": path.strip("/"), "summary": summary,
                               "responses": responses(resp, [])}}
    paths["/model"]["get"]["parameters"] = [{"name": "model", "in": "query", "required": False,
                                             "schema": {"type": "string"}, "description": "A loaded model's name."}]
    paths["/model"]["get"]["responses"] = responses(ModelInfo, ["400"])
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths["/jobs/{job_id}"] = {
        "get": {"operationId": "get_job", "summary": "A job's status, progress and (once done) result.",
                "parameters": job_id, "responses": responses(JobStatus, ["404"])},
        "delete": {"operationId": "cancel_job", "summary": "Cancel a job (it stops before its next chunk).",
                   "parameters": job_id, "responses": responses(JobStatus, ["404"])},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Language model explorer API", "version": version,
                 "description": f"Serving {info['name']} ({info['weights']} weights): "
                                f"{info['n_layers']} layers, {info['n_heads']} heads, n_ctx {info['n_ctx']}."},
        "paths": paths,
        "components": {"schemas": components},
    }
