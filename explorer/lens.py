"""Reading the prediction from the cached run of a text: the logit-lens grid (layers x
positions) with a target's trajectory, token scores (log-probabilities, perplexity, the
next-token distribution at a temperature), and direct logit attribution (DLA).

The core functions take the bridge (or a run) and return tensors or arrays; they run on the
model worker. The endpoint functions at the end take the `Explorer`, validate, read or fill its
cache and return plain JSON types.

- The lens grid reads each position through `analysis.lens_top_k`, the same cached entry
  `/predict` uses, so the two endpoints share every position either has computed.
- Scores read the last layer's residual stream of the cached run; texts not cached yet are run
  as one right-padded batch (`analysis.forward_batch`) and cached like any other run.
- DLA splits the residual stream at one position into what each component wrote (the
  embedding, i.e. `blocks.0.hook_resid_pre`, then every attention and MLP output) and each
  head's share of its layer's attention output (`hook_z` through `W_O`), and reads each through
  the final norm with its scale frozen at the value the actual residual stream gets. With the
  scale fixed, the norm is affine, so the parts add up exactly to the model's logits. Models
  that normalize an attention output before adding it (Gemma 2's post-attention norm) get the
  same treatment for that norm. Logits are decomposed before any output soft-capping.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np
import torch
from transformer_lens.model_bridge.generalized_components.base import align_offloaded_subtree

from . import analysis
from .analysis import PROBABILITY_DIGITS, InvalidRequest, Lens, StopForward, check_index, significant
from .engine import Overloaded, Run
from .targets import Target, TokenSpec, token_id

if TYPE_CHECKING:
    from .service import Explorer

T = TypeVar("T")

LENS_MAX_POSITIONS = 256  # per /lens request: each position projects n_layers vectors through the unembedding
LENS_GRID_TOP_K_MAX = 10
SCORE_MAX_TEXTS = 16
SCORE_BATCH_TOKENS = 2048  # padded tokens per batched forward; more texts run as further batches
SCORE_READOUT_ROWS = 512  # positions per /score projection ([rows, d_vocab] float32: 103 MB for GPT-2)
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-3, 1e3  # past these, softmax(logits / T) is one-hot or uniform anyway
DECIMALS = 6  # log-probabilities, entropies, KL and attributions


# --- the logit-lens grid ----------------------------------------------------------------------

class TargetLens(NamedTuple):
    """One token's place in the lens at one position: probability and rank (1 = top) per layer."""

    probability: np.ndarray  # [n_layers]
    rank: np.ndarray  # [n_layers] int


def target_lens(logits: torch.Tensor, target: int) -> TargetLens:
    """Probability and rank of `target` in lens logits [n_layers, d_vocab] (rank: 1 + the number
    of tokens with a strictly higher logit)."""
    column = logits[:, target : target + 1]
    probability = (column - logits.logsumexp(-1, keepdim=True)).exp()[:, 0]
    rank = (logits > column).sum(-1) + 1
    return TargetLens(probability.cpu().numpy(), rank.cpu().numpy())


def crossover_layer(rank: np.ndarray) -> int | None:
    """The first layer from which the target stays top-1 through the last layer, from its ranks
    [n_layers]; None if it is not top-1 at the last layer."""
    below = np.flatnonzero(rank != 1)
    if below.size and below[-1] == rank.size - 1:
        return None
    return int(below[-1]) + 1 if below.size else 0


# --- token scores -----------------------------------------------------------------------------

class Scores(NamedTuple):
    """What the model thinks of one text: log P of each token given its prefix ([seq - 1], for
    tokens 1..seq-1) and the raw logits of the next token after the last ([d_vocab])."""

    token_logprobs: np.ndarray
    final_logits: np.ndarray


def scores(bridge: Any, runs: Sequence[Run]) -> list[Scores]:
    """`Scores` of cached runs: their last layers read out at every position, all rows in one
    projection ([sum of seq, d_vocab])."""
    x = torch.cat([run.resid[-1] for run in runs]).unsqueeze(0).to(dtype=bridge.cfg.dtype)
    logits = analysis.readout(bridge, x)[0].float()
    out = []
    for run, rows in zip(runs, logits.split([len(run.token_ids) for run in runs])):
        following = run.token_ids[1:].to(rows.device)
        token_logprobs = rows[:-1].log_softmax(-1).gather(-1, following[:, None])[:, 0]
        out.append(Scores(token_logprobs.cpu().numpy(), rows[-1].cpu().numpy()))
    return out


def batches(lengths: Sequence[int], budget: int = SCORE_BATCH_TOKENS) -> list[list[int]]:
    """Indices of texts grouped for padded batches: by length, each group's padded size
    (count x longest) within `budget` tokens (a text longer than the budget runs alone)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


# --- direct logit attribution -----------------------------------------------------------------

_FROZEN_SCALE_WARNING = "A forward hook edited hook_scale"  # the bridge warns; freezing it is the point


def frozen_norm(bridge: Any, name: str, module: Any, scale: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm with its scale frozen: (linear part of each row [n, d_model], offset [d_model]).

    With the scale fixed, any norm the bridge wraps (LayerNorm, RMSNorm, Gemma's 1 + w) is
    affine, y = lin(x) + offset, so the parts of a sum map to parts that add up to the norm of
    the sum. `name` is the norm's hook prefix (`ln_final`, `blocks.3.ln1_post`), `scale` its
    `hook_scale` value for the actual input. The offset (the norm's bias) is its output at 0.
    """
    rows = analysis.to_device_of(rows, module)
    zero = torch.zeros(1, rows.shape[-1], dtype=rows.dtype, device=rows.device)
    with warnings.catch_warnings(), bridge.hooks(fwd_hooks=[
            (f"{name}.hook_scale", lambda t, hook: scale.to(t.device, t.dtype).expand_as(t))]):
        warnings.filterwarnings("ignore", message=_FROZEN_SCALE_WARNING)
        out = module(torch.cat([rows, zero]))
    return out[:-1] - out[-1], out[-1]


def norm_scale(bridge: Any, name: str, module: Any, x: torch.Tensor) -> torch.Tensor:
    """The `hook_scale` value the norm `module` (hook prefix `name`) computes for x [1, d_model]."""
    got: list[torch.Tensor] = []
    with bridge.hooks(fwd_hooks=[(f"{name}.hook_scale", lambda t, hook: got.append(t.detach().clone()))]):
        module(analysis.to_device_of(x, module))
    return got[0]


@dataclass
class Decomposition:
    """The residual stream after the last block at one position, split into what wrote it and
    read through the final norm with its scale frozen (float64, on the model's device).

    rows [1 + n_layers * (3 + n_heads), d_model]: the embedding, each layer's attention output,
    each layer's MLP output, each layer's attention output bias, then each layer's heads
    (layer-major); offset [d_model]: the final norm's bias; resid [d_model]: the residual stream
    itself (to read the model's own metric).
    """

    rows: torch.Tensor
    offset: torch.Tensor
    resid: torch.Tensor
    n_layers: int
    n_heads: int
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.rows, self.offset, self.resid))


def _post_attention_norm(block: Any) -> Any | None:
    """The norm a block applies to its attention output before adding it (Gemma 2: ln1_post)."""
    return block._modules.get("ln1_post")


def decompose(bridge: Any, token_ids: Sequence[int], position: int) -> Decomposition:
    """One forward pass of `token_ids` capturing, at `position` only, what DLA reads; stops
    after the last block."""
    n_layers = int(bridge.cfg.n_layers)
    tokens = torch.tensor([list(token_ids)], dtype=torch.long, device=bridge.cfg.device)
    got: dict[str, torch.Tensor] = {}
    last = analysis.resid_hook(n_layers - 1)
    names = ["blocks.0.hook_resid_pre", last]
    for l in range(n_layers):
        names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out", f"blocks.{l}.attn.hook_z"]
        if _post_attention_norm(bridge.blocks[l]) is not None:
            names.append(f"blocks.{l}.ln1_post.hook_scale")

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            got[name] = tensor[0, position].detach().to(tokens.device, copy=True)  # one device, to stack
            if name == last:
                raise StopForward
        return hook

    try:
        with bridge.hooks(fwd_hooks=[(name, keep(name)) for name in names]):
            bridge(tokens)
    except StopForward:
        pass
    missing = [name for name in names if name not in got]
    if missing:
        raise RuntimeError(f"forward pass did not reach hooks {missing[:3]}")

    f64 = torch.float64
    embed, attn, mlp, bias, heads = [got["blocks.0.hook_resid_pre"].to(f64)], [], [], [], []
    for l in range(n_layers):
        block = bridge.blocks[l]
        z = got[f"blocks.{l}.attn.hook_z"].to(f64)  # [n_heads, d_head]: per query head
        with align_offloaded_subtree(block.attn):  # weights offloaded by --device-map, loaded for this read
            w_o = block.attn.W_O.to(z.device, f64).reshape(z.shape[0], z.shape[1], -1)  # [n_heads, d_head, d_model]
            b_o = block.attn.b_O
            b_o = None if b_o is None else b_o.to(z.device, f64)
        per_head = torch.einsum("hd,hdm->hm", z, w_o)
        b_o = torch.zeros_like(per_head[0]) if b_o is None else b_o
        post = _post_attention_norm(block)
        if post is not None:
            lin, offset = frozen_norm(bridge, f"blocks.{l}.ln1_post", post,
                                      got[f"blocks.{l}.ln1_post.hook_scale"], torch.cat([per_head, b_o[None]]))
            per_head, b_o = lin[:-1].to(tokens.device), (lin[-1] + offset).to(tokens.device)
        attn.append(got[f"blocks.{l}.hook_attn_out"].to(f64))
        mlp.append(got[f"blocks.{l}.hook_mlp_out"].to(f64))
        bias.append(b_o)
        heads.append(per_head)
    resid = got[last]
    rows = torch.stack(embed + attn + mlp + bias + [h for layer in heads for h in layer])
    scale = norm_scale(bridge, "ln_final", bridge.ln_final, resid[None])
    lin, offset = frozen_norm(bridge, "ln_final", bridge.ln_final, scale, rows)
    return Decomposition(lin, offset, resid, n_layers, len(heads[0]))


class Attribution(NamedTuple):
    """DLA of one target at one position (float64 arrays); see `attribute`."""

    embed: np.ndarray
    attn: np.ndarray  # [n_layers]
    mlp: np.ndarray  # [n_layers]
    attn_bias: np.ndarray  # [n_layers]
    heads: np.ndarray  # [n_layers, n_heads]
    bias: np.ndarray
    total: np.ndarray
    model_metric: np.ndarray


def attribute(bridge: Any, parts: Decomposition, target: Target) -> Attribution:
    """Each part's contribution to the target's linear metric (logit difference, or the answer's
    logit): its frozen-norm reading dotted with the metric's unembedding direction. `bias` is what
    the final norm's bias and the unembedding bias add; `total` = embed + attn + mlp + bias (the
    pre-soft-cap metric); `model_metric` is the metric of the model's own output logits."""
    with align_offloaded_subtree(bridge.unembed):  # weights offloaded by --device-map, loaded for this read
        direction = target.direction(bridge.W_U).to(parts.rows.device, torch.float64)
    values = (parts.rows @ direction).cpu().numpy()
    zero = analysis.to_device_of(torch.zeros(1, 1, parts.rows.shape[-1], dtype=bridge.cfg.dtype), bridge.unembed)
    unembed_bias = float(target.linear_metric(bridge.unembed(zero))[0, 0])
    bias = float(parts.offset @ direction) + unembed_bias
    n, h = parts.n_layers, parts.n_heads
    embed, attn, mlp, attn_bias = values[0], values[1:1 + n], values[1 + n:1 + 2 * n], values[1 + 2 * n:1 + 3 * n]
    total = embed + attn.sum() + mlp.sum() + bias
    own = target.linear_metric(analysis.readout(bridge, parts.resid[None, None].to(bridge.cfg.dtype)))[0, 0]
    return Attribution(np.array(embed), attn, mlp, attn_bias, values[1 + 3 * n:].reshape(n, h),
                       np.array(bias), np.array(total), np.array(float(own)))


# --- endpoints (take the Explorer) ------------------------------------------------------------

def on_worker(ex: Explorer, fn: Callable[[], T]) -> T:
    """Run `fn` on the explorer's model worker (inline when already there) and wait for it."""
    if ex.worker.on_worker():
        return fn()
    future = ex.worker.submit(fn)
    try:
        return future.result(timeout=ex.cache.wait_seconds)
    except TimeoutError:
        raise Overloaded(f"the model did not answer within {ex.cache.wait_seconds:.0f} s; retry later", 5) from None


def check_lens_positions(positions: Sequence[int] | None, seq: int) -> list[int]:
    """Validated /lens positions; default every position. 400 past LENS_MAX_POSITIONS."""
    positions = analysis.check_positions("positions", list(range(seq)) if positions is None else positions, seq)
    if len(positions) > LENS_MAX_POSITIONS:
        raise InvalidRequest(f"positions: at most {LENS_MAX_POSITIONS} positions per request, got {len(positions)} "
                             f"(the text has {seq} tokens; pass positions to read part of it)")
    return positions


def _lens_with_target(ex: Explorer, text: str, run: Run, position: int, target: int) -> TargetLens:
    """On the worker: the target's lens at `position`, caching the position's `Lens` from the
    same readout when it is not cached yet."""
    logits = analysis.lens_logits(ex.model.bridge, run, position)
    if ex.cache.get(("lens", text, position)) is None:
        ex.cache.fill(("lens", text, position), analysis.lens_summary(logits))
    return target_lens(logits, target)


def lens(ex: Explorer, text: str, positions: Sequence[int] | None, target: TokenSpec | None,
         top_k: int) -> dict[str, Any]:
    """POST /lens: the logit lens of every layer at `positions` (default all), with a target's
    probability, rank and crossover layer."""
    ids, strs = ex.tokens(text)
    positions = check_lens_positions(positions, len(ids))
    if not 1 <= top_k <= LENS_GRID_TOP_K_MAX:
        raise InvalidRequest(f"top_k must be between 1 and {LENS_GRID_TOP_K_MAX}, got {top_k}")
    d_vocab = int(ex.model.cfg.d_vocab)
    top_k = min(top_k, d_vocab)
    vocab = ex.vocab_strs
    target_id = None if target is None else token_id("target", target, ex.encode, vocab.__getitem__, d_vocab)
    run = ex.run(text)
    bridge = ex.model.bridge
    lenses: list[Lens] = []
    targets: list[TargetLens] = []
    for p in positions:
        if target_id is not None:
            targets.append(ex.cache.get_or_compute(
                ("lens-target", text, p, target_id), lambda p=p: _lens_with_target(ex, text, run, p, target_id)))
        lenses.append(ex.cache.get_or_compute(("lens", text, p), lambda p=p: analysis.lens_top_k(bridge, run, p)))

    def top(lens: Lens, layer: int) -> list[dict[str, Any]]:
        return [{"token": vocab[int(lens.ids[layer, j])], "token_id": int(lens.ids[layer, j]),
                 "probability": significant(lens.probs[layer, j], PROBABILITY_DIGITS)} for j in range(top_k)]

    layers = range(int(ex.model.cfg.n_layers))
    out: dict[str, Any] = {
        "objective": ex.objective,
        "tokens": list(strs),
        "positions": positions,
        "top": [[top(lens, l) for lens in lenses] for l in layers],
        "entropy": [[round(float(lens.entropy[l]), DECIMALS) for lens in lenses] for l in layers],
        "kl_to_final": [[round(float(lens.kl_to_final[l]), DECIMALS) for lens in lenses] for l in layers],
        "final": [top(lens, -1) for lens in lenses],
        "target": None,
    }
    if target_id is not None:
        out["target"] = {
            "token": vocab[target_id], "token_id": target_id,
            "probability": [[significant(t.probability[l], PROBABILITY_DIGITS) for t in targets] for l in layers],
            "rank": [[int(t.rank[l]) for t in targets] for l in layers],
            "crossover_layer": [crossover_layer(t.rank) for t in targets],
        }
    return out


def runs(ex: Explorer, texts: Sequence[str]) -> list[Run]:
    """The cached runs of `texts`; those not cached yet are computed first in padded batches
    (`batches`) on the worker and cached, so every endpoint then reads them."""
    def fill() -> None:
        missing = [t for t in dict.fromkeys(texts) if ex.cache.get(("run", t)) is None]
        ids = [ex.tokens(t)[0] for t in missing]
        for group in batches([len(i) for i in ids]):
            for i, run in zip(group, analysis.forward_batch(ex.model.bridge, [ids[i] for i in group])):
                ex.cache.fill(("run", missing[i]), run)

    if sum(ex.cache.get(("run", t)) is None for t in set(texts)) > 1:
        on_worker(ex, fill)
    return [ex.run(t) for t in texts]


def _scores(ex: Explorer, texts: Sequence[str]) -> list[Scores]:
    """The cached `Scores` of `texts`; those not cached yet are read out together (in groups of
    at most SCORE_READOUT_ROWS rows) on the worker."""
    by_text = dict(zip(texts, runs(ex, texts)))
    bridge = ex.model.bridge

    def fill() -> None:
        missing = [t for t in by_text if ex.cache.get(("score", t)) is None]
        for group in batches([len(by_text[t].token_ids) for t in missing], SCORE_READOUT_ROWS):
            chosen = [missing[i] for i in group]
            for text, s in zip(chosen, scores(bridge, [by_text[t] for t in chosen])):
                ex.cache.fill(("score", text), s)

    if sum(ex.cache.get(("score", t)) is None for t in by_text) > 1:
        on_worker(ex, fill)
    return [ex.cache.get_or_compute(("score", t), lambda t=t: scores(bridge, [by_text[t]])[0]) for t in texts]


def texts_of(texts: Sequence[str] | None, text: str | None) -> list[str]:
    """The texts of a /score request: exactly one of `texts` and `text` must be given."""
    if (texts is None) == (text is None):
        raise InvalidRequest("give exactly one of text (one text) and texts (a list of 1 .. "
                             f"{SCORE_MAX_TEXTS} texts)")
    return [text] if text is not None else list(texts)


def score(ex: Explorer, texts: Sequence[str], temperature: float, top_k: int) -> dict[str, Any]:
    """POST /score: each text's token log-probabilities, perplexity and next-token distribution."""
    ex.require_causal("POST /score")
    if not 1 <= len(texts) <= SCORE_MAX_TEXTS:
        raise InvalidRequest(f"texts must hold between 1 and {SCORE_MAX_TEXTS} texts, got {len(texts)}")
    if not TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX:
        raise InvalidRequest(f"temperature must be between {TEMPERATURE_MIN:g} and {TEMPERATURE_MAX:g} "
                             f"(> 0), got {temperature}")
    if not 1 <= top_k <= analysis.LENS_TOP_K_MAX:
        raise InvalidRequest(f"top_k must be between 1 and {analysis.LENS_TOP_K_MAX}, got {top_k}")
    top_k = min(top_k, int(ex.model.cfg.d_vocab))
    tokens = []
    for i, text in enumerate(texts):
        try:
            tokens.append(ex.tokens(text))
        except InvalidRequest as exc:
            raise InvalidRequest(f"texts[{i}]: {exc}" if len(texts) > 1 else str(exc)) from None
    vocab = ex.vocab_strs
    results = []
    for s, (ids, strs) in zip(_scores(ex, texts), tokens):
        logprobs = [round(float(v), DECIMALS) for v in s.token_logprobs]
        logits = torch.from_numpy(s.final_logits).double()
        top = (logits / temperature).log_softmax(-1).topk(top_k)
        results.append({
            "tokens": list(strs),
            "token_ids": list(ids),
            "token_logprobs": [None, *logprobs],
            "perplexity": (significant(float(np.exp(-np.mean(s.token_logprobs, dtype=np.float64))), PROBABILITY_DIGITS)
                           if logprobs else None),
            "final": [{"token": vocab[i], "token_id": i, "logit": round(float(logits[i]), 4),
                       "logprob": round(lp, DECIMALS), "probability": significant(math.exp(lp), PROBABILITY_DIGITS)}
                      for lp, i in zip(top.values.tolist(), top.indices.tolist())],
        })
    return {"temperature": temperature, "results": results}


def dla(ex: Explorer, text: str, answer: TokenSpec, distractor: TokenSpec | None,
        position: int | None) -> dict[str, Any]:
    """POST /dla: direct logit attribution of the target's metric at `position` (default: last)."""
    ex.require_causal("POST /dla")
    ids, strs = ex.tokens(text)
    position = len(ids) - 1 if position is None else position
    check_index("position", position, len(ids))
    target = ex.target(answer, distractor)
    bridge = ex.model.bridge

    def compute() -> Attribution:
        parts = ex.cache.get_or_compute(("dla-parts", text, position), lambda: decompose(bridge, ids, position))
        return attribute(bridge, parts, target)

    a = ex.cache.get_or_compute(("dla", text, position, target), compute)

    def r(values: Any) -> Any:
        return np.round(np.asarray(values, dtype=np.float64), DECIMALS).tolist()

    return {
        "position": position,
        "token_str": strs[position],
        "metric": "logit_diff" if target.distractor is not None else "logit",
        **target.describe(ex.vocab_strs.__getitem__),
        "embed": r(a.embed), "attn": r(a.attn), "mlp": r(a.mlp), "heads": r(a.heads),
        "attn_bias": r(a.attn_bias), "bias": r(a.bias), "total": r(a.total), "model_metric": r(a.model_metric),
    }
