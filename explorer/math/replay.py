"""Batched interventions: many edited copies of one prompt, each run only through the blocks its
edit can change.

`capture` runs a prompt once and keeps what causal work reads: the residual stream entering
every block, each block's attention and MLP output, each head's `hook_z`, and the arguments the
model passed to each block beside the hidden states (position embeddings, masks).

`run_rows` then replays blocks directly from cached residual states. A row that edits layer `l`
(a patched residual entering block `l`, or a patched attention/MLP/head output of block `l`) is
identical to the unedited run before block `l`, so it joins the batch there: rows are ordered by
their start layer and the batch grows as the layers go up (a wavefront). A sweep over
`n_layers` layers costs about half of the forward passes a naive loop pays, in one batched pass
per chunk instead of one pass per cell, and only the last position is read out.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import torch

from ..runtime.jobs import stop_if_cancelled
from .forward import readout, resid_hook, run_until, to_device_of, tokens_tensor


@dataclass
class BlockInputs:
    """What the model passed to one block besides its hidden states (replayed as recorded)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool


@dataclass
class Acts:
    """Activations of one prompt for causal work, on the model's device, in the model's dtype.

    token_ids [seq] (CPU); resid [n_layers + 1, seq, d_model]: resid[l] enters block l
    (`hook_resid_pre`), resid[n_layers] leaves the last block; attn_out, mlp_out
    [n_layers, seq, d_model]; z [n_layers, seq, n_heads, d_head] (per query head).
    """

    token_ids: torch.Tensor
    resid: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor
    z: torch.Tensor
    blocks: list[BlockInputs] = field(repr=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size()
                          for t in (self.token_ids, self.resid, self.attn_out, self.mlp_out, self.z))

    @property
    def n_layers(self) -> int:
        return self.attn_out.shape[0]

    def site(self, name: str) -> torch.Tensor:
        """The cached activation of a patching site: resid_pre, attn_out, mlp_out or z."""
        return {"resid_pre": self.resid[:-1], "attn_out": self.attn_out, "mlp_out": self.mlp_out, "z": self.z}[name]


SITE_HOOKS = {"attn_out": "blocks.{}.hook_attn_out", "mlp_out": "blocks.{}.hook_mlp_out", "z": "blocks.{}.attn.hook_z"}


def _replayable(value: Any) -> Any:
    """A recorded block argument as it must be replayed: no KV cache (each replay is a fresh pass)."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


def capture(bridge: Any, token_ids: Sequence[int]) -> Acts:
    """One forward pass of `token_ids` keeping what `Acts` holds; stops after the last block."""
    n_layers = int(bridge.cfg.n_layers)
    tokens = tokens_tensor(bridge, [token_ids])
    got: dict[str, torch.Tensor] = {}
    last = resid_hook(n_layers - 1)

    def keep(name: str):
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            got[name] = tensor[0].detach().to(tokens.device, copy=True)  # one device, to stack
        return hook

    names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)] + [last]
    names += [SITE_HOOKS[s].format(l) for s in SITE_HOOKS for l in range(n_layers)]
    blocks: list[BlockInputs | None] = [None] * n_layers

    def record(layer: int):
        def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
            kwargs = {k: _replayable(v) for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            blocks[layer] = BlockInputs(tuple(_replayable(a) for a in args[1:]), kwargs, not args)
        return pre_hook

    handles = [bridge.blocks[l].register_forward_pre_hook(record(l), with_kwargs=True) for l in range(n_layers)]
    try:
        run_until(bridge, tokens, [(n, keep(n)) for n in names], last)
    finally:
        for handle in handles:
            handle.remove()
    if any(b is None for b in blocks):
        raise RuntimeError("forward pass did not reach every block")
    if blocks[0].hidden_in_kwargs:
        for b in blocks:
            b.kwargs.pop("hidden_states", None)
    stack = lambda fmt: torch.stack([got[fmt.format(l)] for l in range(n_layers)])  # noqa: E731
    return Acts(
        token_ids=tokens[0].cpu(),
        resid=torch.cat([stack("blocks.{}.hook_resid_pre"), got[last][None]]),
        attn_out=stack(SITE_HOOKS["attn_out"]), mlp_out=stack(SITE_HOOKS["mlp_out"]), z=stack(SITE_HOOKS["z"]),
        blocks=blocks,  # type: ignore[arg-type]
    )


@dataclass
class Edit:
    """Replace part of one activation in some rows of a replay batch.

    `t[rows, positions, heads] = values`, where a missing `positions` means every position and a
    missing `heads` every head (heads apply to `hook_z` only). `values` broadcasts: [n, ...].
    """

    hook: str
    rows: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor | None = None
    heads: torch.Tensor | None = None

    @property
    def layer(self) -> int:
        """The block whose hook point this edit replaces (`blocks.{layer}. ...`)."""
        return int(self.hook.split(".")[1])

    def __call__(self, tensor: torch.Tensor, hook: Any) -> torch.Tensor:
        out = tensor.clone()  # a new tensor: the hooked one may be a view the block still reads
        values = self.values.to(out.device, out.dtype)
        rows = self.rows.to(out.device)
        if self.heads is None:
            if self.positions is None:
                out[rows] = values
            else:
                out[rows, self.positions.to(out.device)] = values
        elif self.positions is None:
            out[rows, :, self.heads.to(out.device)] = values
        else:
            out[rows, self.positions.to(out.device), self.heads.to(out.device)] = values
        return out


@dataclass(frozen=True)
class Budget:
    """What one chunk of model work may use: `rows` replayed at once (their activations inside a
    block must fit the working-memory budget) and `work` rows x positions x blocks between two
    yields (about CHUNK_SECONDS of the worker's time at the measured throughput). `meter`, when
    given, is told the operations and seconds of every replayed block (the session's throughput)."""

    rows: int
    work: float
    meter: Callable[[float, float], None] | None = field(default=None, compare=False)


CHUNK_SECONDS = 0.5  # interactive requests wait for at most about this much of a long request's work


def _block(bridge: Any, layer: int, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    hidden = to_device_of(hidden, bridge.blocks[layer])
    if inputs.hidden_in_kwargs:
        out = bridge.blocks[layer](hidden_states=hidden, **inputs.kwargs)
    else:
        out = bridge.blocks[layer](hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_rows(bridge: Any, blocks: Sequence[BlockInputs], starts: Sequence[tuple[int, torch.Tensor]],
             edits: Sequence[Edit], budget: Budget = Budget(1, math.inf)) -> Generator[float, None, torch.Tensor]:
    """Run rows from their start layers to the end; return the last position's logits [rows, d_vocab].

    starts: (layer, states [n, seq, d_model]) groups in ascending layer order; the rows are
    numbered in that order, so the batch at block `l` is rows 0 .. (rows starting at <= l) - 1,
    and `Edit.rows` index it directly. A group at layer n_layers only reads out. An edit must only
    touch rows that have joined by its layer.

    A generator: it yields its progress (a fraction) whenever the next block would take the
    block work since the last yield past `budget.work` (rows x positions x blocks), so one long
    row still leaves the worker every `budget.work`. Each block's edits are attached only while that
    block runs: no hook of ours is on the model between two yields, when other requests use it.
    """
    n_layers = len(blocks)
    groups = list(starts)
    seq = groups[0][1].shape[1]
    total = sum(s.shape[0] * (n_layers - l) for l, s in groups) * seq or 1
    by_layer: dict[int, list[Edit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    state: torch.Tensor | None = None
    done = since = 0
    for layer in range(groups[0][0], n_layers + 1):
        joining = [s for l, s in groups if l == layer]
        if joining:
            device = joining[0].device if state is None else state.device
            parts = ([] if state is None else [state]) + [s.to(device) for s in joining]
            state = torch.cat(parts) if len(parts) > 1 else parts[0]
        if layer < n_layers and state is not None:
            stop_if_cancelled()
            work = state.shape[0] * seq
            if since and since + work > budget.work:
                yield done / total
                since = 0
            hooks = [(e.hook, e) for e in by_layer.get(layer, ())]
            with bridge.hooks(fwd_hooks=hooks) if hooks else contextlib.nullcontext():
                state = _metered(bridge, layer, state, blocks[layer], budget.meter)
            done += work
            since += work
    assert state is not None
    return readout(bridge, state[:, -1:, :])[:, 0]


def row_bytes(cfg: Any, seq: int) -> int:
    """Working memory of one replayed row inside a block (attention scores and the MLP's hidden
    layer dominate), in float32."""
    d_model, n_heads = int(cfg.d_model), int(cfg.n_heads)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    return 4 * seq * (8 * d_model + 2 * d_mlp + 3 * n_heads * seq)


def position_flops(cfg: Any, seq: int) -> float:
    """Floating-point operations of one position through one block, in a text of `seq` tokens."""
    d_model = int(cfg.d_model)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d_model)
    return 2 * (4 * d_model * d_model + 2 * d_model * d_mlp) + 4 * seq * d_model


def budget(cfg: Any, seq: int, max_bytes: int, flops_per_second: float,
           meter: Callable[[float, float], None] | None = None) -> Budget:
    """The chunk budget of a text of `seq` tokens: rows from `max_bytes` of working memory, work
    from CHUNK_SECONDS at `flops_per_second`."""
    return Budget(max(1, max_bytes // row_bytes(cfg, seq)),
                  CHUNK_SECONDS * flops_per_second / position_flops(cfg, seq), meter)


def _metered(bridge: Any, layer: int, hidden: torch.Tensor, inputs: BlockInputs,
             meter: Callable[[float, float], None] | None) -> torch.Tensor:
    """One block, its operations and seconds reported to `meter`."""
    started = time.perf_counter()
    out = _block(bridge, layer, hidden, inputs)
    if meter is not None:
        meter(hidden.shape[0] * hidden.shape[1] * position_flops(bridge.cfg, hidden.shape[1]),
              time.perf_counter() - started)
    return out


def plan_chunks(starts: Sequence[int], rows_per_cell: int, seq: int, n_layers: int,
                budget: Budget) -> list[tuple[int, int]]:
    """Split cells (sorted by start layer) into [begin, end) ranges of at most `budget.rows` rows
    and about `budget.work` block work (a cell is never split: one may exceed the work, and
    `run_rows` then yields inside it)."""
    chunks: list[tuple[int, int]] = []
    begin, rows, work = 0, 0, 0.0
    for i, start in enumerate(starts):
        cell_work = rows_per_cell * seq * max(n_layers - start, 1)
        if i > begin and (rows + rows_per_cell > budget.rows or work + cell_work > budget.work):
            chunks.append((begin, i))
            begin, rows, work = i, 0, 0.0
        rows += rows_per_cell
        work += cell_work
    if begin < len(starts):
        chunks.append((begin, len(starts)))
    return chunks


def run_states(bridge: Any, blocks: Sequence[BlockInputs], states: torch.Tensor, out: torch.Tensor,
               budget: Budget) -> Generator[float, None, None]:
    """Every block's input and the last block's output for rows entering block 0, written to
    out [n_layers + 1, rows, seq, d_model]; yields its progress when the work since the last
    yield would pass `budget.work` (as `run_rows`)."""
    n_layers = len(blocks)
    work = states.shape[0] * states.shape[1]
    out[0] = states
    since = 0
    for layer, inputs in enumerate(blocks):
        stop_if_cancelled()
        if since and since + work > budget.work:
            yield layer / n_layers
            since = 0
        out[layer + 1] = _metered(bridge, layer, out[layer], inputs, budget.meter).to(out.device)  # one device
        since += work
