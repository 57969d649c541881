"""Steering vectors and adding them to the residual stream while the model runs.

- ActAdd (Turner et al. 2023): the residual stream of a positive and a negative prompt at one
  site, position by position; the shorter prompt is padded on the right with the space token (as
  the paper pads), so the difference has one row per position of the longer one, added to the
  sequence's first positions.
- Mean difference (CAA, Rimsky et al. 2024): the mean over the positive texts of the residual
  at their last position, minus the same over the negative texts.
- Given values.

An `Addition` adds `rows[at(p)]` at every absolute position p where `at(p)` is not None; with the
KV cache a step's pass sees only its new positions, so the hook maps them back by offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformer_lens.model_bridge.generalized_components.base import align_offloaded_subtree

from .forward import Hook, run_until, tokens_tensor

SITES = ("resid_pre", "resid_post")


def hook_name(layer: int, site: str) -> str:
    """The hook point of `site` ("resid_pre": entering block `layer`; "resid_post": leaving it)."""
    return f"blocks.{layer}.hook_{site}"


def residual(bridge: Any, ids: Sequence[int], layer: int, site: str) -> torch.Tensor:
    """The residual stream of `ids` at `site` of `layer`: [seq, d_model] float32 (the pass stops there)."""
    name, got = hook_name(layer, site), []
    run_until(bridge, tokens_tensor(bridge, [ids]), [(name, lambda t, hook: got.append(t[0].detach().float()))], name)
    return got[0]


def actadd(bridge: Any, positive: Sequence[int], negative: Sequence[int], pad: int, layer: int,
           site: str) -> torch.Tensor:
    """positive - negative residuals, position by position, the shorter padded with `pad`: [L, d_model]."""
    length = max(len(positive), len(negative))
    padded = [list(ids) + [pad] * (length - len(ids)) for ids in (positive, negative)]
    return residual(bridge, padded[0], layer, site) - residual(bridge, padded[1], layer, site)


def last_position_mean(bridge: Any, texts: Sequence[Sequence[int]], layer: int, site: str) -> torch.Tensor:
    """The mean over `texts` of the residual at each one's last position: [d_model]."""
    return torch.stack([residual(bridge, ids, layer, site)[-1] for ids in texts]).mean(0)


def scaled(vector: torch.Tensor, coefficient: float, unit: bool) -> torch.Tensor:
    """`coefficient` x `vector`, each row first divided by its norm when `unit` (a zero row stays zero)."""
    if unit:
        norms = vector.norm(dim=-1, keepdim=True)
        vector = vector / torch.where(norms > 0, norms, torch.ones_like(norms))
    return coefficient * vector


@dataclass
class Addition:
    """Add `rows[at(p)]` to the activation at hook `name` at absolute position p."""

    name: str
    rows: torch.Tensor  # [k, d_model]
    at: Callable[[int], int | None]

    def hook(self, offset: int) -> Hook:
        """The hook for a pass whose first position is `offset` (0 for a whole sequence)."""
        def add(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
            picks = [(j, self.at(offset + j)) for j in range(tensor.shape[1])]
            picks = [(j, r) for j, r in picks if r is not None]
            if not picks:
                return tensor
            out = tensor.clone()
            js, rs = zip(*picks)
            out[:, list(js)] += self.rows[list(rs)].to(out.device, out.dtype)
            return out
        return add


def steer(additions: Sequence[Addition]) -> Callable[[int], list[tuple[str, Hook]]]:
    """`Decoder`'s steer: the hooks of every addition for a pass starting at `offset`."""
    return lambda offset: [(a.name, a.hook(offset)) for a in additions]


def through_unembedding(bridge: Any, vector: torch.Tensor, k: int) -> tuple[list[int], list[float], list[int], list[float]]:
    """The tokens `vector` (d_model) promotes and suppresses read straight through the unembedding
    (W_U, no final norm): the k largest and the k smallest entries of vector @ W_U, with their values."""
    with align_offloaded_subtree(bridge.unembed):  # weights offloaded by --device-map, loaded for this read
        logits = vector.to(bridge.W_U.device, bridge.W_U.dtype) @ bridge.W_U
    logits = logits.float().cpu()
    up, down = torch.topk(logits, k), torch.topk(-logits, k)
    return up.indices.tolist(), up.values.tolist(), down.indices.tolist(), (-down.values).tolist()
