"""Which heads matter: ablation and attribution patching (`operations.ablate`, `.attribution_patch`).

Ablation replaces one head's `hook_z` (every position), or one layer's attention or MLP output,
by zeros or by its mean over the positions of reference texts, and reads the metric. Each
ablation is a cell of the same batched replay as activation patching (`patching.run_cells`): the
"source" activations are the ablation values at every position (`everywhere`).

Attribution patching (Nanda 2023) estimates a whole patching grid from one backward pass: the
metric's change when an activation moves from the base run's value to the source run's is about
`(source_act - base_act) . d metric / d act`, the gradient taken at the base run (the corrupt
prompt when denoising).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import replay
from .forward import readout, resid_hook, run_until, tokens_tensor
from .target import Target

MEAN_SITES = ("z", "attn_out", "mlp_out")


def add_sums(sums: dict[str, torch.Tensor], acts: replay.Acts) -> int:
    """Add one text's activations summed over its positions to `sums` (per site, float32:
    z [n_layers, n_heads, d_head], attn_out and mlp_out [n_layers, d_model]); returns its positions."""
    for name in MEAN_SITES:
        total = acts.site(name).float().sum(1)
        sums[name] = sums[name] + total if name in sums else total
    return len(acts.token_ids)


def everywhere(acts: replay.Acts, values: dict[str, torch.Tensor] | None) -> replay.Acts:
    """Activations shaped like `acts` holding the ablation value at every position: `values`
    (per layer and site, as `add_sums` sums them) or zeros. Broadcast views, no copies."""
    def spread(name: str) -> torch.Tensor:
        cached = acts.site(name)  # [n_layers, seq, ...]
        value = torch.zeros_like(cached[:, 0]) if values is None else values[name].to(cached.dtype)
        return value[:, None].expand_as(cached)

    return replay.Acts(acts.token_ids, acts.resid, spread("attn_out"), spread("mlp_out"), spread("z"), acts.blocks)


# --- attribution patching ---------------------------------------------------------------------

def site_hooks(site: str, n_layers: int) -> list[str]:
    """The hook of each layer whose activation a patching site replaces."""
    if site == "resid_pre":
        return [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
    name = replay.SITE_HOOKS["z" if site.startswith("heads") else site]
    return [name.format(l) for l in range(n_layers)]


def gradients(bridge: Any, token_ids: Sequence[int], target: Target, hooks: list[str]) -> list[torch.Tensor]:
    """d metric / d activation at each of `hooks` in one run of `token_ids`, each shaped like the
    hook's tensor without its batch axis ([seq, d_model], or [seq, n_heads, d_head] for hook_z).

    Grad mode is on only inside this function (the model worker runs under inference mode). Each
    activation gets a zero leaf added to it and only those leaves are differentiated
    (`torch.autograd.grad`), so no parameter's `.grad` is touched; the hooks go with the context
    manager. The pass stops after the last block and reads only the last position's logits.
    """
    n_layers = int(bridge.cfg.n_layers)
    with torch.inference_mode(False), torch.enable_grad():
        tokens = tokens_tensor(bridge, [token_ids])
        deltas: dict[str, torch.Tensor] = {}
        final: list[torch.Tensor] = []

        def add_delta(name: str):
            def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
                deltas[name] = torch.zeros_like(tensor, requires_grad=True)
                return tensor + deltas[name]
            return hook

        last = resid_hook(n_layers - 1)
        fwd_hooks = [(name, add_delta(name)) for name in hooks]
        fwd_hooks.append((last, lambda tensor, hook: final.append(tensor)))
        run_until(bridge, tokens, fwd_hooks, last)
        metric = target.metric(readout(bridge, final[0][:, -1:, :])[0, 0])
        leaves = [deltas[name] for name in hooks]
        grads = torch.autograd.grad(metric, leaves, allow_unused=True)
    return [torch.zeros_like(leaf[0]).detach() if g is None else g[0].detach() for leaf, g in zip(leaves, grads)]


def attribution(site: str, base: replay.Acts, source: replay.Acts, grads: torch.Tensor) -> np.ndarray:
    """The attribution grid: (source_act - base_act) . grad summed over the site's dimensions,
    [n_layers, seq] ([n_layers, n_heads] for heads, [n_layers, n_heads, seq] heads_by_position);
    `grads` stacks `gradients` over the layers."""
    name = "z" if site.startswith("heads") else site
    per_position = ((source.site(name).float() - base.site(name).float()) * grads.float()).sum(-1)
    if site == "heads":
        per_position = per_position.sum(1)
    elif site == "heads_by_position":
        per_position = per_position.transpose(1, 2)
    return np.ascontiguousarray(per_position.cpu().numpy(), dtype=np.float32)


def agreement(estimate: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    """How far an estimated grid is from the real one: Pearson correlation over all cells (null
    when either grid is constant), the largest absolute error, and the largest per layer (axis 0)."""
    a, b = estimate.astype(np.float64).ravel(), exact.astype(np.float64).ravel()
    pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    error = np.abs(estimate.astype(np.float64) - exact).reshape(len(exact), -1).max(1)
    return {"pearson": pearson if pearson is not None and np.isfinite(pearson) else None,
            "max_abs_error": float(error.max()), "max_abs_error_by_layer": error.astype(np.float32)}
