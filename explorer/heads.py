"""Which heads matter: ablation (`POST /ablate`) and attribution patching (`POST /attribution_patch`).

Ablation replaces one head's `hook_z` (every position), or one layer's attention or MLP output,
by zeros or by its mean over the positions of reference texts, and reads the metric. Each
ablation is a cell of the same batched replay as activation patching (`patching.run_cells`): the
"source" activations are the ablation values at every position.

Attribution patching (Nanda 2023) estimates a whole patching grid from one backward pass: the
metric's change when an activation moves from the base run's value to the source run's is about
`(source_act - base_act) . d metric / d act`, the gradient taken at the base run (the corrupt
prompt when denoising). `compare` runs the real patching sweep (`patching.patch`) beside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence

import numpy as np
import torch

from . import patching, replay
from .analysis import InvalidRequest, StopForward, check_choice, readout
from .targets import Target

if TYPE_CHECKING:
    from .service import Explorer

ABLATION_SITES = {"heads": "heads", "attn": "attn_out", "mlp": "mlp_out"}  # -> the patching site
METHODS = ("mean", "zero")
MAX_REFERENCE_TEXTS = 64


def scaled(steps: Iterator[Any], start: float, span: float) -> Generator[float, None, Any]:
    """Run a job's steps, yielding their progress mapped onto [start, start + span]; returns their result."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as stop:
            return stop.value
        yield start + span * float(progress)


# --- ablation ---------------------------------------------------------------------------------

def ablate(ex: "Explorer", text: str, target: Target, method: str, reference_texts: Sequence[str] | None,
           site: str) -> Iterator[Any]:
    """Validate an /ablate request now (400s before any job starts); return its job's steps."""
    ex.require_causal("POST /ablate")
    check_choice("site", site, ABLATION_SITES)
    check_choice("method", method, METHODS)
    ex.tokens(text)
    if reference_texts is not None:
        if method != "mean":
            raise InvalidRequest("reference_texts applies only to method 'mean' (zero ablation uses no reference)")
        if not 1 <= len(reference_texts) <= MAX_REFERENCE_TEXTS:
            raise InvalidRequest(f"reference_texts must hold 1 to {MAX_REFERENCE_TEXTS} texts, got {len(reference_texts)}")
        for i, ref in enumerate(reference_texts):
            try:
                ex.tokens(ref)
            except InvalidRequest as exc:
                raise InvalidRequest(f"reference_texts[{i}]: {exc}") from None
    references = None if method == "zero" else list(reference_texts or [text])
    return _ablate_steps(ex, text, target, references, site)


def _means(ex: "Explorer", texts: list[str]) -> Generator[float, None, tuple[dict[str, torch.Tensor], int]]:
    """Mean over every position (BOS included) of every reference text of each site's activation:
    z [n_layers, n_heads, d_head], attn_out and mlp_out [n_layers, d_model] (float32); and the
    number of positions. One forward pass per text not cached yet, one text per chunk."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for i, text in enumerate(texts):
        if i:
            yield i / len(texts)
        acts = ex.acts(text)
        for name in ("z", "attn_out", "mlp_out"):
            total = acts.site(name).float().sum(1)
            sums[name] = sums[name] + total if name in sums else total
        count += len(acts.token_ids)
    return {name: total / count for name, total in sums.items()}, count


def _everywhere(acts: replay.Acts, values: dict[str, torch.Tensor] | None) -> replay.Acts:
    """Activations shaped like `acts` holding the ablation value at every position: `values`
    (per layer, as `_means` returns them) or zeros. Broadcast views, no copies."""
    def spread(name: str) -> torch.Tensor:
        cached = acts.site(name)  # [n_layers, seq, ...]
        value = torch.zeros_like(cached[:, 0]) if values is None else values[name].to(cached.dtype)
        return value[:, None].expand_as(cached)

    return replay.Acts(acts.token_ids, acts.resid, spread("attn_out"), spread("mlp_out"), spread("z"), acts.blocks)


def _ablate_steps(ex: "Explorer", text: str, target: Target, references: list[str] | None,
                  site: str) -> Iterator[Any]:
    bridge, cfg = ex.model.bridge, ex.model.cfg
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    share = 0.0 if references is None else len(references) / (len(references) + 1)  # of the progress
    means, positions = None, None
    if references is not None:
        means, positions = yield from scaled(_means(ex, references), 0.0, share)
    acts = ex.acts(text)
    baseline = np.float32(target.metric(patching.final_logits(bridge, acts)).cpu())
    if site == "heads":
        cells = [patching.Cell(l, None, h) for l in range(n_layers) for h in range(n_heads)]
    else:
        cells = [patching.Cell(l) for l in range(n_layers)]
    metric = yield from scaled(patching.run_cells(bridge, ABLATION_SITES[site], cells, acts,
                                                  _everywhere(acts, means), target), share, 1 - share)
    return {
        "site": site, "method": "zero" if references is None else "mean", "metric": target.metric_name,
        "baseline": baseline,
        "effect": (metric - baseline).reshape((n_layers, n_heads) if site == "heads" else (n_layers,)),
        "tokens": list(ex.tokens(text)[1]),
        **target.describe(lambda i: ex.vocab_strs[i]),
        "rows": [f"L{l}" for l in range(n_layers)],
        "columns": [f"H{h}" for h in range(n_heads)] if site == "heads" else None,
        "reference_texts": None if references is None else len(references),
        "reference_positions": positions,
    }


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
        tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=bridge.cfg.device)
        deltas: dict[str, torch.Tensor] = {}
        final: list[torch.Tensor] = []

        def add_delta(name: str):
            def hook(tensor: torch.Tensor, hook: Any) -> torch.Tensor:
                deltas[name] = torch.zeros_like(tensor, requires_grad=True)
                return tensor + deltas[name]
            return hook

        def stop(tensor: torch.Tensor, hook: Any) -> None:
            final.append(tensor)
            raise StopForward

        fwd_hooks = [(name, add_delta(name)) for name in hooks]
        fwd_hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", stop))
        try:
            with bridge.hooks(fwd_hooks=fwd_hooks):
                bridge(tokens)
        except StopForward:
            pass
        metric = target.metric(readout(bridge, final[0][:, -1:, :])[0, 0])
        leaves = [deltas[name] for name in hooks]
        grads = torch.autograd.grad(metric, leaves, allow_unused=True)
    return [torch.zeros_like(leaf[0]).detach() if g is None else g[0].detach() for leaf, g in zip(leaves, grads)]


def attribution_patch(ex: "Explorer", clean: str, corrupt: str, target: Target, site: str, direction: str,
                      compare: bool) -> Iterator[Any]:
    """Validate an /attribution_patch request now (400s before any job starts); return its job's steps."""
    ex.require_causal("POST /attribution_patch")
    exact = patching.patch(ex, clean, corrupt, target, site, direction)  # validates; runs only if compared
    return _attribution_steps(ex, clean, corrupt, target, site, direction, exact if compare else None)


def _attribution_steps(ex: "Explorer", clean: str, corrupt: str, target: Target, site: str, direction: str,
                       exact: Iterator[Any] | None) -> Iterator[Any]:
    bridge, cfg = ex.model.bridge, ex.model.cfg
    n_layers = int(cfg.n_layers)
    clean_acts, corrupt_acts = ex.acts(clean), ex.acts(corrupt)
    base, source = (corrupt_acts, clean_acts) if direction == "denoise" else (clean_acts, corrupt_acts)
    clean_metric, corrupt_metric = patching.pair_metrics(bridge, target, clean_acts, corrupt_acts)
    base_metric = corrupt_metric if direction == "denoise" else clean_metric
    grads = torch.stack(gradients(bridge, base.token_ids.tolist(), target, site_hooks(site, n_layers))).float()
    name = "z" if site.startswith("heads") else site
    per_position = ((source.site(name).float() - base.site(name).float()) * grads).sum(-1)  # [layers, seq(, heads)]
    if site == "heads":
        per_position = per_position.sum(1)
    elif site == "heads_by_position":
        per_position = per_position.transpose(1, 2)
    attribution = np.ascontiguousarray(per_position.cpu().numpy(), dtype=np.float32)
    result = patching.grid_response(ex, clean, corrupt, target, site, direction, clean_metric, corrupt_metric,
                                    base_metric + attribution)
    result.update(attribution=attribution, exact_available=True)
    if exact is not None:
        real = yield from scaled(exact, 0.5, 0.5)
        result.update(exact_effect=real["effect"], exact_recovery=real["recovery"],
                      **agreement(result["effect"], real["effect"]))
    return result


def agreement(estimate: np.ndarray, exact: np.ndarray) -> dict[str, Any]:
    """How far an estimated grid is from the real one: Pearson correlation over all cells (null
    when either grid is constant), the largest absolute error, and the largest per layer (axis 0)."""
    a, b = estimate.astype(np.float64).ravel(), exact.astype(np.float64).ravel()
    pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None
    error = np.abs(estimate.astype(np.float64) - exact).reshape(len(exact), -1).max(1)
    return {"pearson": pearson if pearson is not None and np.isfinite(pearson) else None,
            "max_abs_error": float(error.max()), "max_abs_error_by_layer": error.astype(np.float32)}
