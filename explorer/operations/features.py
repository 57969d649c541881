"""POST /features: a text read through a sparse autoencoder — each token's most active features,
how many are active (L0), and how faithful the reconstruction is on this text. Read from the
cached run's activation at the SAE's hook, encoded once per (text, SAE) (`Explorer.features`)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..math import sae as sae_math
from ..session import Explorer
from .base import TextRequest, check_top_k, operation, shape

MAX_TOP_K = sae_math.TOP_K


class SaeRequest(TextRequest):
    sae: StrictStr = Field(description="Name of a loaded SAE (GET /saes).")


class FeaturesRequest(SaeRequest):
    top_k: StrictInt = Field(default=10, json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K},
                             description=f"Most active features listed per token, 1 .. {MAX_TOP_K} (only active ones).")


class FeatureActivation(BaseModel):
    index: int
    activation: float = Field(description="float32.")


class FeatureToken(BaseModel):
    token: str
    token_id: int
    l0: int = Field(description="How many features are active (nonzero) at this token.")
    relative_mse: float = Field(description="|x - x̂|² / |x|² of this token's reconstruction (float32).")
    variance_explained: float = Field(description=(
        "1 - |x - x̂|² / |x - mean(x)|², the mean over the token's d_in entries (float32)."))
    features: list[FeatureActivation] = Field(description="The top_k most active features, largest first.")


class Reconstruction(BaseModel):
    relative_mse: float = Field(description="Σ|x - x̂|² / Σ|x|² over the text's tokens (float64).")
    variance_explained: float = Field(description=(
        "1 - Σ|x - x̂|² / Σ|x - x̄|², x̄ the text's mean token (as SAELens's evaluations; float64)."))
    l0: float = Field(description="Mean active features per token.")


class SaeInfo(BaseModel):
    name: str
    model: Optional[str]
    hook: str
    layer: int
    head: Optional[int]
    d_in: int
    d_sae: int
    architecture: str
    k: Optional[int]
    apply_b_dec_to_input: bool
    normalize_activations: str
    source: dict[str, Any]


class FeaturesResponse(BaseModel):
    sae: SaeInfo
    tokens: list[FeatureToken]
    reconstruction: Reconstruction


@operation("/features", FeaturesRequest, FeaturesResponse,
           "A text read through a sparse autoencoder: each token's top features, L0 and reconstruction quality.")
def features(ex: Explorer, req: FeaturesRequest) -> dict[str, Any]:
    sae = ex.sae(req.sae)
    top_k = check_top_k(req.top_k, MAX_TOP_K, sae.d_sae)
    ids, strs = ex.tokens(req.source)
    enc = ex.encoded(req.source, sae)
    values, indices, l0 = enc.top_values[:, :top_k], enc.top_indices[:, :top_k], enc.l0
    q = enc.quality
    tokens = [{"token": s, "token_id": i, "l0": int(l0[p]), "relative_mse": q["relative_mse"][p],
               "variance_explained": q["variance_explained"][p],
               "features": [{"index": int(j), "activation": v} for j, v in zip(indices[p], values[p]) if v != 0]}
              for p, (i, s) in enumerate(zip(ids, strs))]
    return shape(FeaturesResponse, sae=sae.info(), tokens=tokens,
                 reconstruction={"relative_mse": q["text_relative_mse"], "variance_explained": q["text_variance_explained"],
                                 "l0": float(l0.mean())})
