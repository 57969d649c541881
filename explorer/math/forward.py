"""The model's forward pass and what is read from it: the cached run of a text, the readout
(final norm + unembedding), PCA trajectories and the logit lens. Pure functions of tensors and
the bridge; those that touch the model must run on the model worker thread.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..runtime.jobs import interruptible, stop_if_cancelled
from ..runtime.loading import execution_device

# Cached float16 patterns hold weight * 2^15: float16's normal range then reaches down to
# 2^-14 / 2^15 ~ 1.9e-9 (subnormals to 2^-39 ~ 1.8e-12) instead of 6.1e-5 (6e-8), so small
# weights keep their relative precision; the largest value, 2^15, is far below float16's 65504.
PATTERN_SCALE = 2.0 ** 15
# A nonzero weight below even the scaled subnormal range is stored as the smallest subnormal
# (2^-39 ~ 1.8e-12, 0 only for exact zeros such as masked future positions), never as 0.
SMALLEST_SUBNORMAL = 2.0 ** -24
LENS_TOP_K = 100  # each position's lens keeps this many top tokens (the most any request reads)


@dataclass
class Run:
    """Cached activations of one text.

    token_ids: [seq] (BOS first, on the CPU); resid: [n_layers, seq, d_model] float32 (resid_post
    of each block); patterns: [n_layers, n_heads, seq, seq] float16 holding weight * 2^15
    (`PATTERN_SCALE`; row = query, column = key). resid and patterns live on the model's device.
    """

    token_ids: torch.Tensor
    resid: torch.Tensor
    patterns: torch.Tensor
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.token_ids, self.resid, self.patterns))


class StopForward(Exception):
    """Raised by our own hook after the last hook a pass needs: the rest is never computed."""


Hook = Callable[[torch.Tensor, Any], Any]


def run_until(bridge: Any, tokens: torch.Tensor, hooks: Sequence[tuple[str, Hook]], stop: str) -> None:
    """Run the model on `tokens` with `hooks` attached for this call only, and stop the pass
    right after the hooks at `stop` have run (no later block, no unembedding). Every hook point
    named must be reached; a RuntimeError names those that were not. The one place a pass is cut
    short: the cached run, activations for patching, DLA, gradients and gates all use it."""
    seen: set[str] = set()

    def seeing(name: str, fn: Hook) -> Hook:
        def hook(tensor: torch.Tensor, hook: Any) -> Any:
            seen.add(name)
            return fn(tensor, hook)
        return hook

    def halt(tensor: torch.Tensor, hook: Any) -> None:
        raise StopForward

    attached = [(name, seeing(name, fn)) for name, fn in hooks] + [(stop, halt)]
    if interruptible():  # a job's chunk: a cancel stops the pass after the block running now
        attached += [(resid_hook(l), lambda tensor, hook: stop_if_cancelled()) for l in range(int(bridge.cfg.n_layers))]
    try:
        with bridge.hooks(fwd_hooks=attached):
            bridge(tokens)
    except StopForward:
        pass
    missing = [name for name, _ in hooks if name not in seen]
    if missing:
        raise RuntimeError(f"forward pass did not reach hooks {missing[:3]}")


def tokens_tensor(bridge: Any, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token ids (equal lengths) as a [batch, seq] long tensor on the model's device."""
    return torch.tensor([list(ids) for ids in batch], dtype=torch.long, device=bridge.cfg.device)


def resid_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def forward(bridge: Any, token_ids: Sequence[int]) -> Run:
    """Run the model once on `token_ids` and keep only what the endpoints read (`forward_batch`
    of one text: no padding, so the run is exactly that of the text alone)."""
    return forward_batch(bridge, [token_ids])[0]


def forward_batch(bridge: Any, batch: Sequence[Sequence[int]]) -> list[Run]:
    """Run the model once on several texts' token ids, right-padded into one batch; one `Run` each.

    Hooks are attached for this call only (`bridge.hooks` removes them on exit) and the pass
    stops after the last block, skipping the [seq, d_vocab] unembedding a plain forward pays.
    Right padding leaves a causal model's real positions alone: they never attend to the pad
    tokens after them and keep position ids 0..len-1, so each run equals the text's own pass up
    to float rounding (~1e-6: batched matmuls round differently), not bit for bit. Only causal
    models may be batched with padding; one text needs no padding.
    """
    cfg = bridge.cfg
    n_layers, seq = int(cfg.n_layers), max(len(ids) for ids in batch)
    pad = 0  # any id: causal attention never lets a real position see it
    tokens = tokens_tensor(bridge, [list(ids) + [pad] * (seq - len(ids)) for ids in batch])
    # Each hook copies into tensors preallocated on the model's device (patterns straight to
    # scaled float16, `store_pattern`), so no layer's float32 pattern outlives its block and
    # nothing is stacked afterwards: at 1024 tokens that is 600 MB less to allocate and copy. On a GPU the run stays
    # there: copying it to the host would cost several forward passes.
    size = len(batch)
    resid = torch.empty(size, n_layers, seq, int(cfg.d_model), dtype=torch.float32, device=cfg.device)
    patterns = torch.empty(size, n_layers, int(cfg.n_heads), seq, seq, dtype=torch.float16, device=cfg.device)

    def keep(out: torch.Tensor, store: Any = torch.Tensor.copy_) -> Hook:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            store(out, tensor.detach())  # detach: callers outside inference_mode (notebooks) too
        return hook

    hooks = [(pattern_hook(l), keep(patterns[:, l], store_pattern)) for l in range(n_layers)]
    hooks += [(resid_hook(l), keep(resid[:, l])) for l in range(n_layers)]
    run_until(bridge, tokens, hooks, resid_hook(n_layers - 1))
    if size == 1:
        return [Run(token_ids=tokens[0].cpu(), resid=resid[0], patterns=patterns[0])]
    return [Run(token_ids=tokens[b, :len(ids)].cpu(), resid=resid[b, :, :len(ids)].clone(),
                patterns=patterns[b, :, :, :len(ids), :len(ids)].clone()) for b, ids in enumerate(batch)]


def store_pattern(out: torch.Tensor, pattern: torch.Tensor) -> None:
    """Copy attention weights into the float16 cache `out` as weight * PATTERN_SCALE; a nonzero
    weight that would round to 0 keeps the smallest subnormal instead.

    Plain float32 arithmetic, no masks: `scaled * 2^110` lifts every positive float32 (down to
    2^-134) to at least SMALLEST_SUBNORMAL and leaves 0 at 0, so its clamp is the floor each
    weight needs. Boolean masks over float16 ran ~5x slower on a CPU.
    """
    scaled = pattern.float() * PATTERN_SCALE
    floor = (scaled * 2.0 ** 110).clamp_max_(SMALLEST_SUBNORMAL)
    out.copy_(torch.maximum(scaled, floor, out=floor))


def layer_pattern(bridge: Any, token_ids: Sequence[int], layer: int) -> np.ndarray:
    """The attention pattern of `layer` as the model computes it, in float32 (the cached run
    holds it scaled in float16): [n_heads, seq, seq]. One forward pass through blocks 0..layer."""
    found: list[torch.Tensor] = []
    name = pattern_hook(layer)
    keep = lambda t, hook: found.append(t.detach()[0].float().cpu())  # noqa: E731
    run_until(bridge, tokens_tensor(bridge, [token_ids]), [(name, keep)], name)
    return found[0].numpy()


_PCA_LOCK = threading.Lock()


@functools.cache
def _blas() -> Any:
    """numpy's and scipy's BLAS libraries (found once: `threadpool_limits` rescans them, ~1 ms)."""
    import scipy.linalg  # noqa: F401  (loads scipy's own BLAS so the controller sees it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _top2(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two largest eigenpairs of a symmetric PSD [m, m] matrix: (values [2], vectors [m, 2]).

    Largest first. Lanczos (ARPACK) from a fixed start, run to machine precision, is 5-10x faster
    than LAPACK's dense solver at these sizes and deterministic; tiny matrices and the cases
    ARPACK refuses (a zero matrix) take the dense solver.
    """
    from scipy.linalg import eigh
    from scipy.sparse.linalg import ArpackError, eigsh

    m = sym.shape[0]
    values = vectors = None
    with _blas().limit(limits=1, user_api="blas"):  # matrix-vector products: one thread is faster
        if m > 8:
            try:
                v0 = np.random.default_rng(0).standard_normal(m)
                values, vectors = eigsh(sym, k=2, which="LA", v0=v0, tol=0)
            except ArpackError:
                pass
        if values is None:
            values, vectors = eigh(sym, subset_by_index=[m - 2, m - 1])
    order = np.argsort(values)[::-1]
    return values[order].clip(min=0), vectors[:, order]


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact 2D PCA of [n_points, d] points: ([n_points, 2] coordinates, explained-variance ratios).

    Equal to scikit-learn's `PCA(n_components=2)`, sign included (the tests check it), but it only
    computes the two components asked for: the top-2 eigenpairs of the smaller of the Gram
    [n, n] and covariance [d, d] matrices. Each component is signed so that its largest loading
    is positive, as scikit-learn does. Row order does not change the result. numpy, not torch:
    on a CPU its float64 products run ~2x faster.
    """
    x = points - points.mean(axis=0)
    n, d = x.shape
    # BLAS thread limits are process-wide: one PCA at a time, so each runs with the same thread
    # counts and rounds the same way (answers stay byte-identical under concurrency).
    with _PCA_LOCK:
        if n <= d:
            values, u = _top2(x @ x.T)
            loadings = x.T @ u  # components scaled by sqrt(values): enough to choose the sign
            coords = u * np.sqrt(values)
        else:
            values, loadings = _top2(x.T @ x)
            coords = x @ loadings
    coords *= np.sign(loadings[np.abs(loadings).argmax(axis=0), [0, 1]])
    total = float(np.einsum("ij,ij->", x, x))
    return coords, (values / total if total > 0 else np.zeros(2))


def trace_pca(run: Run, token_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """One shared 2D PCA of the requested tokens' states at every layer.

    Fit on resid[:, token_indices] ([n_layers * len(indices), d_model]) so all points share one
    coordinate system. Returns (xy [len(indices), n_layers, 2], explained-variance ratios [2]).
    Indices must be valid positions.
    """
    n_layers, _, d_model = run.resid.shape
    index = torch.tensor(list(token_indices), dtype=torch.long, device=run.resid.device)
    points = run.resid.index_select(1, index).reshape(-1, d_model)  # layer-major rows
    flat, explained = pca_2d(points.to("cpu", torch.float64).numpy())
    return flat.reshape(n_layers, len(index), 2).transpose(1, 0, 2), explained


class Lens(NamedTuple):
    """The logit lens at one position, every layer: the top K = LENS_TOP_K tokens (probs,
    logits, ids: [n_layers, K], most probable first) and, of the whole distribution, its entropy
    and KL(final || layer) in nats ([n_layers]; KL is exactly 0 at the last layer)."""

    probs: np.ndarray
    logits: np.ndarray
    ids: np.ndarray
    entropy: np.ndarray
    kl_to_final: np.ndarray


def to_device_of(x: torch.Tensor, module: Any) -> torch.Tensor:
    """`x` on the device `module` computes on (a model split over devices: `--device-map`)."""
    return x.to(execution_device(module, x.device))


def readout(bridge: Any, resid: torch.Tensor) -> torch.Tensor:
    """Logits of residual states [batch, pos, d_model] -> [batch, pos, d_vocab]: the final norm,
    the unembedding and the architecture's own output transform (Gemma's logit soft-capping),
    so the last layer's readout equals the model's output. A masked-LM head (BERT) first applies
    its dense layer and activation (its `ln_final` is the head's own LayerNorm). The one place
    every lens, metric and patched run reads logits from."""
    mlm_head = getattr(bridge, "mlm_head", None)
    if mlm_head is not None:
        resid = _activation(bridge.cfg.act_fn)(mlm_head(to_device_of(resid, mlm_head)))
    normed = bridge.ln_final(to_device_of(resid, bridge.ln_final))
    return bridge.adapter.apply_output_logits_transform(bridge.unembed(to_device_of(normed, bridge.unembed)))


@functools.cache
def _activation(name: str) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def lens_logits(bridge: Any, run: Run, position: int,
                transport: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> torch.Tensor:
    """Logit lens at one position: readout(resid_post_l) for every layer l -> [n_layers, d_vocab]
    float32. Always one position per call: a batched matmul rounds differently in the last bits,
    and a prefetched answer must be byte-identical to one computed on demand.

    `transport(residual, layer)` (a Jacobian lens's: J[l] @ residual in float32) first maps each
    layer below the last into the last block's output basis; the last layer is read as it is (its
    transport is the identity). J = I gives the logit lens exactly: a product with an identity
    matrix rounds nothing."""
    x = run.resid[:, position, :]
    if transport is not None:
        x = torch.cat([torch.stack([transport(x[l], l) for l in range(len(x) - 1)]), x[-1:].float()])
    return readout(bridge, x.unsqueeze(0).to(dtype=bridge.cfg.dtype))[0].float()


def lens_summary(logits: torch.Tensor) -> Lens:
    """`Lens` of the lens logits [n_layers, d_vocab] at one position."""
    k = min(LENS_TOP_K, logits.shape[-1])
    top_logits, ids = logits.topk(k, dim=-1)
    lse = logits.logsumexp(dim=-1, keepdim=True)
    probs = (top_logits - lse).exp()
    logp = logits - lse
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    kl = (p[-1] * (logp[-1] - logp)).sum(-1)  # the last row minus itself: exactly 0
    return Lens(*(t.cpu().numpy() for t in (probs, top_logits, ids, entropy, kl)))


def lens_top_k(bridge: Any, run: Run, position: int,
               transport: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> Lens:
    """Logit lens at one position: softmax(unembed(ln_final(resid_post_l))) for every layer l
    (through a Jacobian lens's `transport` when given, `lens_logits`), summarized as a `Lens`.
    Only this position is projected."""
    return lens_summary(lens_logits(bridge, run, position, transport))
