"""Reading the prediction from the cached run of a text: a target's place in the logit lens,
token scores (log-probabilities and the next-token logits), and direct logit attribution (DLA).
Functions of the bridge and runs, returning tensors or arrays; they run on the model worker.

- Scores read the last layer's residual stream of a run at every position.
- DLA splits the residual stream at one position into what each component wrote (the
  embedding, i.e. `blocks.0.hook_resid_pre`, then every attention and MLP output) and each
  head's share of its layer's attention output (`hook_z` through `W_O`), and reads each through
  the final norm with its scale frozen at the value the actual residual stream gets. With the
  scale fixed, the norm is affine, so the parts add up exactly to the model's logits. Models
  that normalize an attention output before adding it (Gemma 2's post-attention norm) get the
  same treatment for that norm. Logits are decomposed before any output soft-capping.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from transformer_lens.model_bridge.generalized_components.base import align_offloaded_subtree

from .forward import Run, readout, resid_hook, run_until, to_device_of, tokens_tensor
from .target import Target


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


READOUT_ROWS = 512  # positions per projection: [rows, d_vocab] float32 is 103 MB for GPT-2


def scores(bridge: Any, runs: Sequence[Run]) -> list[Scores]:
    """`Scores` of cached runs: their last layers read out at every position, the runs' rows
    concatenated and projected READOUT_ROWS at a time (so many short texts share one projection
    and a long one never holds all its [seq, d_vocab] logits at once)."""
    x = torch.cat([run.resid[-1] for run in runs]).to(dtype=bridge.cfg.dtype)  # [rows, d_model]
    # the token after each row within its run; -1 after a run's last row (its logits are kept)
    following = torch.cat([torch.cat([run.token_ids[1:], torch.tensor([-1])]) for run in runs]).to(x.device)
    logprobs = torch.zeros(len(x), dtype=torch.float32, device=x.device)
    finals: list[np.ndarray] = []
    for begin in range(0, len(x), READOUT_ROWS):
        logits = readout(bridge, x[None, begin:begin + READOUT_ROWS])[0].float()
        after = following[begin:begin + READOUT_ROWS]
        scored = after >= 0
        logprobs[begin:begin + len(after)][scored] = (
            logits[scored].log_softmax(-1).gather(-1, after[scored][:, None])[:, 0])
        finals += [logits[i].cpu().numpy() for i in torch.nonzero(~scored)[:, 0].tolist()]
    ends = np.cumsum([len(run.token_ids) for run in runs])
    values = logprobs.cpu().numpy()
    return [Scores(values[end - len(run.token_ids):end - 1], final)
            for run, end, final in zip(runs, ends, finals)]


def batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
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
    rows = to_device_of(rows, module)
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
        module(to_device_of(x, module))
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
    tokens = tokens_tensor(bridge, [token_ids])
    got: dict[str, torch.Tensor] = {}
    last = resid_hook(n_layers - 1)
    names = ["blocks.0.hook_resid_pre", last]
    for l in range(n_layers):
        names += [f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out", f"blocks.{l}.attn.hook_z"]
        if _post_attention_norm(bridge.blocks[l]) is not None:
            names.append(f"blocks.{l}.ln1_post.hook_scale")

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            got[name] = tensor[0, position].detach().to(tokens.device, copy=True)  # one device, to stack
        return hook

    run_until(bridge, tokens, [(name, keep(name)) for name in names], last)

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
    zero = to_device_of(torch.zeros(1, 1, parts.rows.shape[-1], dtype=bridge.cfg.dtype), bridge.unembed)
    unembed_bias = float(target.linear_metric(bridge.unembed(zero))[0, 0])
    bias = float(parts.offset @ direction) + unembed_bias
    n, h = parts.n_layers, parts.n_heads
    embed, attn, mlp, attn_bias = values[0], values[1:1 + n], values[1 + n:1 + 2 * n], values[1 + 2 * n:1 + 3 * n]
    total = embed + attn.sum() + mlp.sum() + bias
    own = target.linear_metric(readout(bridge, parts.resid[None, None].to(bridge.cfg.dtype)))[0, 0]
    return Attribution(np.array(embed), attn, mlp, attn_bias, values[1 + 3 * n:].reshape(n, h),
                       np.array(bias), np.array(total), np.array(float(own)))
