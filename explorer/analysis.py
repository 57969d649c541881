"""Core computations: forward pass capture, trajectories (PCA), attention and the logit lens.

Functions that touch the model (`forward`, `lens_top_k`) must run on the model worker thread;
the others work on a cached `Run` and return plain JSON types.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .engine import Run

ATTENTION_DECIMALS = 4  # patterns are cached as float16 (~3 significant digits) anyway
PROBABILITY_DIGITS = 6  # significant digits: lens probabilities span many orders of magnitude
LENS_TOP_K_MAX = 100  # top_k is bounded; each position's lens is computed once at this size


class InvalidRequest(ValueError):
    """A request that is well-formed JSON but asks for something out of range (HTTP 400)."""


class _StopForward(Exception):
    """Raised by our own hook after the last block: the unembedding is never needed here."""


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def forward(bridge: Any, token_ids: Sequence[int]) -> Run:
    """Run the model once on `token_ids` and keep only what the endpoints read.

    Hooks are attached for this call only (`bridge.hooks` removes them on exit) and the pass
    stops after the last block, skipping the [seq, d_vocab] unembedding a plain forward pays.
    """
    n_layers = int(bridge.cfg.n_layers)
    tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=bridge.cfg.device)
    store: dict[str, torch.Tensor] = {}
    last = resid_hook(n_layers - 1)

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            store[name] = tensor[0].detach()
            if name == last:
                raise _StopForward
        return hook

    names = [pattern_hook(l) for l in range(n_layers)] + [resid_hook(l) for l in range(n_layers)]
    try:
        with bridge.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
            bridge(tokens)
    except _StopForward:
        pass
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"forward pass did not reach hooks {missing[:3]}")
    resid = torch.stack([store[resid_hook(l)] for l in range(n_layers)]).float().cpu()
    patterns = torch.stack([store[pattern_hook(l)] for l in range(n_layers)]).half().cpu()
    return Run(token_ids=tokens[0].cpu(), resid=resid, patterns=patterns)


def check_index(name: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise InvalidRequest(f"{name} must be between 0 and {size - 1}, got {value}")


def check_token_indices(token_indices: Sequence[int] | None, seq: int, n_layers: int) -> list[int]:
    """Validated trace indices; default: every token but BOS (index 0)."""
    if token_indices is None:
        token_indices = list(range(1, seq)) or [0]
    if not token_indices:
        raise InvalidRequest("token_indices must not be empty")
    for i in token_indices:
        check_index("token_indices[]", i, seq)
    if len(set(token_indices)) != len(token_indices):
        raise InvalidRequest("token_indices must not contain duplicates")
    if len(token_indices) * n_layers < 2:
        raise InvalidRequest("trace needs at least 2 points (tokens x layers) for a 2D PCA")
    return list(token_indices)


def trace(run: Run, token_indices: Sequence[int]) -> dict[str, Any]:
    """Per-token trajectories through every layer, projected by one shared 2D PCA.

    The PCA is fit on resid[:, token_indices] ([n_layers * len(indices), d_model]) so all points
    share one coordinate system. Indices must pass `check_token_indices`.
    """
    from sklearn.decomposition import PCA

    n_layers = run.resid.shape[0]
    points = run.resid[:, list(token_indices), :].transpose(0, 1).reshape(-1, run.resid.shape[-1])
    # Both solvers are exact; the covariance one is ~50x faster for 1000 tokens x 12 layers.
    solver = "covariance_eigh" if points.shape[0] >= points.shape[1] else "full"
    pca = PCA(n_components=2, svd_solver=solver)
    xy = pca.fit_transform(points.double().numpy()).reshape(len(token_indices), n_layers, 2)
    return {
        "trajectories": {
            str(i): [{"layer": l, "x": float(xy[k, l, 0]), "y": float(xy[k, l, 1])} for l in range(n_layers)]
            for k, i in enumerate(token_indices)
        },
        "token_indices": list(token_indices),
        "pca_explained_variance": [float(v) for v in pca.explained_variance_ratio_],
    }


def attention(run: Run, layer: int, head: int | None) -> np.ndarray:
    """Attention pattern(s) of `layer`: [seq, seq] for one head, else [n_heads, seq, seq].

    Rounded to ATTENTION_DECIMALS; `layer` and `head` must be in range (`check_index`).
    """
    pattern = run.patterns[layer] if head is None else run.patterns[layer, head]
    return np.round(pattern.float().numpy(), ATTENTION_DECIMALS)


def lens_top_k(bridge: Any, run: Run, position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logit lens at one position: softmax(unembed(ln_final(resid_post_l))) for every layer l.

    Returns (probs [n_layers, K], logits [n_layers, K], ids [n_layers, K]) of the top
    K = LENS_TOP_K_MAX tokens, sorted by probability. Only this position is projected.
    """
    x = run.resid[:, position, :].unsqueeze(0).to(device=bridge.cfg.device, dtype=bridge.cfg.dtype)
    logits = bridge.unembed(bridge.ln_final(x))[0].float()  # [n_layers, d_vocab]
    k = min(LENS_TOP_K_MAX, logits.shape[-1])
    top_logits, ids = logits.topk(k, dim=-1)
    probs = (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    return probs.cpu().numpy(), top_logits.cpu().numpy(), ids.cpu().numpy()


def predictions(lens: tuple[np.ndarray, np.ndarray, np.ndarray], top_k: int,
                token_strs: Sequence[str]) -> list[dict[str, Any]]:
    """`predictions_by_layer` from `lens_top_k` output; `token_strs` decodes vocabulary ids."""
    probs, logits, ids = lens
    return [
        {
            "layer": layer,
            "top_tokens": [
                {"token": token_strs[int(ids[layer, j])], "token_id": int(ids[layer, j]),
                 "probability": float(f"{probs[layer, j]:.{PROBABILITY_DIGITS}g}"),
                 "logit": round(float(logits[layer, j]), 4)}
                for j in range(top_k)
            ],
        }
        for layer in range(probs.shape[0])
    ]
