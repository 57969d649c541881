"""Sparse-autoencoder features of activations, and edits of one feature in the model's pass.

The encoders follow SAELens's inference SAEs exactly (`runtime/saes.py` says why the library is
not used): the input is normalized (`normalize_activations`), `b_dec` is subtracted when
`apply_b_dec_to_input`, then
- standard: relu(x W_enc + b_enc)
- topk: the k largest of x W_enc + b_enc, each through relu, the rest 0 (torch.topk's choice
  among ties)
- jumprelu: relu(pre) where pre = x W_enc + b_enc is above its threshold, else 0
- gated: [x W_enc + b_gate > 0] * relu(x (W_enc * exp(r_mag)) + b_mag)
and the decoder is f W_dec + b_dec, mapped back through the normalization.

An edit replaces the hook's activation x by x + decode(f') - decode(f): the reconstruction plus
the error term, with the feature edited. With f' = f the change is exactly 0, so an edit that
changes nothing changes no output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from transformer_lens.model_bridge.generalized_components.base import align_offloaded_subtree

from ..runtime.saes import SAE
from . import replay
from .forward import run_until, tokens_tensor
from .lens import frozen_norm, norm_scale
from .target import Target

LAYER_NORM_EPS = 1e-5  # SAELens's layer_norm normalization
SPARSE_DECODE = 20  # decode through the active rows only when under 1 in this many features is active
TOP_K = 100  # each token's most active features kept with a text's features (the most /features lists)
# The hooks whose activation `replay.Acts` holds, so edits can be replayed from it: kind by suffix.
EDITABLE = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
            "hook_mlp_out": "mlp_out", "attn.hook_z": "z"}
RESIDUAL_SPACE = ("resid_pre", "resid_post", "attn_out", "mlp_out")  # the decoder writes d_model vectors


def hook_kind(hook: str) -> str | None:
    """resid_pre | resid_post | attn_out | mlp_out | z for the hooks edits support, else None."""
    return EDITABLE.get(re.sub(r"^blocks\.\d+\.", "", hook))


def flat(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The SAE's input from the hook's activation [seq, ...]: float32 [seq, d_in] (hook_z's heads
    concatenated, or one head's)."""
    if sae.head is not None:
        x = x[:, sae.head]
    return x.reshape(x.shape[0], -1).float()


def unflat(sae: SAE, delta: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`delta` [n, seq, d_in] in the hook's shape [n, *like.shape] (zero outside one head's slice)."""
    if sae.head is None:
        return delta.reshape(delta.shape[0], *like.shape)
    out = torch.zeros(delta.shape[0], *like.shape, dtype=delta.dtype, device=delta.device)
    out[:, :, sae.head] = delta
    return out


def _normalization(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
    """(x normalized as the SAE was trained, scale, shift): a decoder output y maps back to x's
    scale as y * scale + shift (per token)."""
    if sae.normalize_activations == "constant_norm_rescale":
        coeff = sae.d_in ** 0.5 / x.norm(dim=-1, keepdim=True)
        return x * coeff, 1 / coeff, 0.0
    if sae.normalize_activations == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        return (x - mu) / (std + LAYER_NORM_EPS), std, mu
    return x, 1.0, 0.0


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Feature activations of the SAE's inputs x [n, d_in] -> [n, d_sae] (float32)."""
    p = sae.params
    x, _, _ = _normalization(sae, x.to(p["W_enc"].device, torch.float32))
    if sae.apply_b_dec_to_input:
        x = x - p["b_dec"]
    if sae.architecture == "gated":
        gate = (x @ p["W_enc"] + p["b_gate"]) > 0
        return gate * torch.relu(x @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"])
    pre = x @ p["W_enc"] + p["b_enc"]
    if sae.architecture == "topk":
        top = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
    if sae.architecture == "jumprelu":
        return torch.relu(pre) * (pre > p["threshold"])
    return torch.relu(pre)


def decode(sae: SAE, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction of x [n, d_in] from its features f [n, d_sae] -> [n, d_in]. Only the
    active features' decoder rows are read when few are active (as in a trained SAE)."""
    _, scale, shift = _normalization(sae, x.to(f.device, torch.float32))
    w = sae.params["W_dec"]
    if f.count_nonzero() * SPARSE_DECODE < f.numel():
        out = torch.sparse.mm(f.to_sparse(), w)
    else:
        out = f @ w
    return (out + sae.params["b_dec"]) * scale + shift


@dataclass
class Encoded:
    """A text's features under one SAE: activations [seq, d_sae] float32 (on the SAE's device),
    each token's TOP_K most active features (values and indices [seq, K], CPU, largest first) and
    active count (l0 [seq]), and the reconstruction's quality (`quality`)."""

    acts: torch.Tensor
    top_values: np.ndarray
    top_indices: np.ndarray
    l0: np.ndarray
    quality: dict[str, Any]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.acts.numel() * self.acts.element_size() + self.top_values.nbytes + self.top_indices.nbytes


def encoded(sae: SAE, activation: torch.Tensor) -> Encoded:
    """`Encoded` of the hook's activation [seq, ...]."""
    x = flat(sae, activation).to(sae.params["W_enc"].device)
    f = encode(sae, x)
    top = f.topk(min(TOP_K, sae.d_sae), dim=-1)
    return Encoded(f, top.values.cpu().numpy(), top.indices.cpu().numpy(), (f != 0).sum(-1).cpu().numpy(),
                   quality(x, decode(sae, f, x)))


def quality(x: torch.Tensor, recon: torch.Tensor) -> dict[str, Any]:
    """How faithful a reconstruction is, per token and over the text (x, recon [seq, d_in]):
    relative MSE |x - x̂|² / |x|², and the fraction of variance explained, 1 - |x - x̂|² / |x - x̄|²
    (x̄: per token, the mean over its d_in entries; over the text, the mean token, as SAELens's
    evaluations take it)."""
    x = x.to(recon.device, torch.float64)
    err = ((x - recon.double()) ** 2).sum(-1)
    energy = (x ** 2).sum(-1)
    spread = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    total_spread = ((x - x.mean(0, keepdim=True)) ** 2).sum()

    def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))
    return {"relative_mse": ratio(err, energy).cpu().numpy().astype(np.float32),
            "variance_explained": (1 - ratio(err, spread)).cpu().numpy().astype(np.float32),
            "text_relative_mse": float(ratio(err.sum(), energy.sum())),
            "text_variance_explained": float(1 - ratio(err.sum(), total_spread))}


def hook_activation(bridge: Any, token_ids: Sequence[int], hook: str) -> torch.Tensor:
    """The activation at `hook` [seq, ...] of one pass over `token_ids` (stopped there)."""
    got: list[torch.Tensor] = []
    run_until(bridge, tokens_tensor(bridge, [token_ids]), [(hook, lambda t, h: got.append(t[0].detach()))], hook)
    return got[0]


def from_acts(acts: replay.Acts, sae: SAE) -> torch.Tensor:
    """The SAE hook's activation [seq, ...] as `replay.Acts` holds it (the pass edits replay)."""
    kind, layer = hook_kind(sae.hook), sae.layer
    if kind == "resid_pre":
        return acts.resid[layer]
    if kind == "resid_post":
        return acts.resid[layer + 1]
    return acts.site(kind)[layer]


def edited(sae: SAE, x: torch.Tensor, f: torch.Tensor, index: Sequence[int], values: torch.Tensor,
           positions: Sequence[int] | None) -> torch.Tensor:
    """The hook's activation x [seq, ...] with, in row r, feature index[r] set to values[r] at
    `positions` (None: every position): [rows, seq, ...] in x's dtype. The decoder is linear, so
    decode(f') - decode(f) is the change of the one feature times its decoder row (times the
    normalization's per-token scale): exactly 0 where the activation does not change."""
    inputs = flat(sae, x)
    _, scale, _ = _normalization(sae, inputs.to(f.device))
    rows = torch.tensor(list(index), device=f.device)
    change = values.to(f.device, torch.float32)[:, None] - f[:, rows].T  # [rows, seq]
    if positions is not None:
        keep = torch.zeros(f.shape[0], dtype=torch.bool, device=f.device)
        keep[list(positions)] = True
        change = torch.where(keep, change, torch.zeros_like(change))
    delta = change[:, :, None] * sae.params["W_dec"][rows][:, None, :] * scale  # [rows, seq, d_in]
    return (x.to(delta.device, torch.float32) + unflat(sae, delta, x)).to(x.dtype)


def replay_plan(sae: SAE, acts: replay.Acts, rows: torch.Tensor) -> tuple[list[tuple[int, torch.Tensor]], list[replay.Edit]]:
    """`replay.run_rows`' starts and edits for rows of edited hook activations [n, seq, ...]."""
    kind, layer = hook_kind(sae.hook), sae.layer
    if kind == "resid_pre":
        return [(layer, rows)], []
    if kind == "resid_post":
        return [(layer + 1, rows)], []
    n = rows.shape[0]
    hook = replay.SITE_HOOKS[kind].format(layer)
    return [(layer, acts.resid[layer].expand(n, -1, -1))], [replay.Edit(hook, torch.arange(n), rows)]


def output_direction(sae: SAE, index: int) -> torch.Tensor | None:
    """What feature `index` writes into the residual stream per unit of activation: its decoder row
    (None for hook_z SAEs, whose decoder writes into the heads' values before W_O)."""
    return sae.params["W_dec"][index] if hook_kind(sae.hook) in RESIDUAL_SPACE else None


def direct_attribution(bridge: Any, direction: torch.Tensor, final_resid: torch.Tensor, target: Target) -> float:
    """The target's linear metric of `direction` [d_model] read through the final norm with its
    scale frozen at the residual stream `final_resid` [d_model] (as `/dla` reads each part)."""
    scale = norm_scale(bridge, "ln_final", bridge.ln_final, final_resid[None].to(bridge.cfg.dtype))
    lin, _ = frozen_norm(bridge, "ln_final", bridge.ln_final, scale, direction[None].to(torch.float64))
    with align_offloaded_subtree(bridge.unembed):  # weights offloaded by --device-map, loaded for this read
        unembed = target.direction(bridge.W_U).to(lin.device, torch.float64)
    return float(lin[0] @ unembed)
