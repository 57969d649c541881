"""Activation patching (`POST /patch`): which layer, position or head carries the difference
between a clean and a corrupt prompt.

Denoising (the default) runs the corrupt prompt and patches in one clean activation per cell;
noising runs the clean prompt and patches in a corrupt one. Every cell is one row of a batched
replay (`replay.run_rows`) starting at the cell's layer; a cell whose patched activation equals
the base run's (positions before the prompts first differ, in a causal model) is not run: its
metric is the base run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generator, Iterator

import numpy as np
import torch

from . import replay
from .analysis import check_choice, readout
from .targets import Target, check_same_length, recovery

if TYPE_CHECKING:
    from .service import Explorer

SITES = ("resid_pre", "attn_out", "mlp_out", "heads", "heads_by_position")
DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Cell:
    """One patch: at `layer`, one `position` (None: all) and/or one `head` (None: the whole site)."""

    layer: int
    position: int | None = None
    head: int | None = None


def grid_cells(site: str, n_layers: int, n_heads: int, seq: int) -> tuple[list[Cell], tuple[int, ...]]:
    """The cells of a site in row-major grid order, and the grid's shape."""
    if site in ("resid_pre", "attn_out", "mlp_out"):
        return [Cell(l, p) for l in range(n_layers) for p in range(seq)], (n_layers, seq)
    if site == "heads":
        return [Cell(l, None, h) for l in range(n_layers) for h in range(n_heads)], (n_layers, n_heads)
    return ([Cell(l, p, h) for l in range(n_layers) for h in range(n_heads) for p in range(seq)],
            (n_layers, n_heads, seq))


def _value(acts: replay.Acts, site: str, cell: Cell) -> torch.Tensor:
    """The activation a cell replaces: [d_model], [seq, d_head] or [d_head]."""
    if site in ("heads", "heads_by_position"):
        z = acts.z[cell.layer]  # [seq, n_heads, d_head]
        return z[:, cell.head] if cell.position is None else z[cell.position, cell.head]
    return acts.site(site)[cell.layer, cell.position]


def cell_rows(site: str, cells: list[Cell], base: replay.Acts,
              source: replay.Acts) -> tuple[list[tuple[int, torch.Tensor]], list[replay.Edit]]:
    """The replay plan of `cells` (sorted by layer): one row each, starting at its layer."""
    starts: list[tuple[int, torch.Tensor]] = []
    edits: list[replay.Edit] = []
    row = 0
    for layer in sorted({c.layer for c in cells}):
        group = [c for c in cells if c.layer == layer]
        n = len(group)
        rows = torch.arange(row, row + n)
        positions = torch.tensor([c.position for c in group]) if group[0].position is not None else None
        heads = torch.tensor([c.head for c in group]) if group[0].head is not None else None
        states = base.resid[layer].expand(n, -1, -1)
        if site == "resid_pre":
            states = states.clone()
            states[torch.arange(n), positions] = source.resid[layer, positions]
        elif site in ("attn_out", "mlp_out"):
            edits.append(replay.Edit(replay.SITE_HOOKS[site].format(layer), rows,
                                     source.site(site)[layer, positions], positions=positions))
        else:
            z = source.z[layer]
            values = z[:, heads].transpose(0, 1) if positions is None else z[positions, heads]
            edits.append(replay.Edit(replay.SITE_HOOKS["z"].format(layer), rows, values,
                                     positions=positions, heads=heads))
        starts.append((layer, states))
        row += n
    return starts, edits


def final_logits(bridge: Any, acts: replay.Acts) -> torch.Tensor:
    """The model's next-token logits after the prompt's last token [d_vocab]."""
    return readout(bridge, acts.resid[-1:, -1:, :])[0, 0]


def patch(ex: "Explorer", clean: str, corrupt: str, target: Target, site: str,
          direction: str) -> Iterator[Any]:
    """Validate a /patch request now (400s before any job starts); return its job's steps."""
    ex.require_causal("POST /patch")
    check_choice("site", site, SITES)
    check_choice("direction", direction, DIRECTIONS)
    clean_ids, clean_strs = ex.tokens(clean)
    corrupt_ids, corrupt_strs = ex.tokens(corrupt)
    check_same_length(clean_ids, corrupt_ids, clean_strs, corrupt_strs)
    return _patch_steps(ex, clean, corrupt, target, site, direction)


def pair_metrics(bridge: Any, target: Target, clean: replay.Acts,
                 corrupt: replay.Acts) -> tuple[np.float32, np.float32]:
    """The metric on each unpatched prompt, as float32 like the grids (so a cell equal to one
    serializes identically)."""
    return (np.float32(target.metric(final_logits(bridge, clean)).cpu()),
            np.float32(target.metric(final_logits(bridge, corrupt)).cpu()))


def run_cells(bridge: Any, site: str, cells: list[Cell], base: replay.Acts, source: replay.Acts,
              target: Target) -> Generator[float, None, np.ndarray]:
    """The metric after each cell's replacement [len(cells)]: `base` run with the cell's
    activation taken from `source`. Cells must be sorted by layer. Runs in chunks (batched
    replays), yielding the progress before each but the first."""
    cfg = bridge.cfg
    seq, n_layers = base.resid.shape[1], int(cfg.n_layers)
    out = np.empty(len(cells), dtype=np.float32)
    chunks = replay.plan_chunks([c.layer for c in cells], 1, seq, n_layers,
                                replay.row_budget(cfg, seq, str(cfg.device)))
    yield 0.0
    for done, (begin, end) in enumerate(chunks, 1):
        starts, edits = cell_rows(site, cells[begin:end], base, source)
        out[begin:end] = target.metric(replay.run_rows(bridge, base.blocks, starts, edits)).cpu().numpy()
        if done < len(chunks):
            yield done / len(chunks)
    return out


def grid_response(ex: "Explorer", clean: str, corrupt: str, target: Target, site: str, direction: str,
                  clean_metric: np.float32, corrupt_metric: np.float32, grid: np.ndarray) -> dict[str, Any]:
    """The fields every clean/corrupt grid answer shares (`/patch`, `/attribution_patch`), with
    `grid` as the effect and its recovery."""
    rec, warning = recovery(grid, clean_metric, corrupt_metric)
    tokens_clean, tokens_corrupt = list(ex.tokens(clean)[1]), list(ex.tokens(corrupt)[1])
    result: dict[str, Any] = {
        "site": site, "direction": direction, "metric": target.metric_name,
        "clean_metric": clean_metric, "corrupt_metric": corrupt_metric,
        "tokens_clean": tokens_clean, "tokens_corrupt": tokens_corrupt,
        **target.describe(lambda i: ex.vocab_strs[i]),
        "effect": grid, "recovery": rec,
        "rows": [f"L{l}" for l in range(int(ex.model.cfg.n_layers))],
        "columns": [f"H{h}" for h in range(int(ex.model.cfg.n_heads))] if site.startswith("heads") else tokens_clean,
    }
    if site == "heads_by_position":
        result["positions"] = tokens_clean
    if warning:
        result["warning"] = warning
    return result


def _patch_steps(ex: "Explorer", clean: str, corrupt: str, target: Target, site: str,
                 direction: str) -> Iterator[Any]:
    bridge, cfg = ex.model.bridge, ex.model.cfg
    clean_acts, corrupt_acts = ex.acts(clean), ex.acts(corrupt)
    base, source = (corrupt_acts, clean_acts) if direction == "denoise" else (clean_acts, corrupt_acts)
    clean_metric, corrupt_metric = pair_metrics(bridge, target, clean_acts, corrupt_acts)
    base_metric = corrupt_metric if direction == "denoise" else clean_metric
    cells, shape = grid_cells(site, int(cfg.n_layers), int(cfg.n_heads), len(clean_acts.token_ids))
    effect = np.full(len(cells), base_metric, dtype=np.float32)
    todo = [i for i, c in enumerate(cells) if not torch.equal(_value(base, site, c), _value(source, site, c))]
    effect[todo] = yield from run_cells(bridge, site, [cells[i] for i in todo], base, source, target)
    result = grid_response(ex, clean, corrupt, target, site, direction, clean_metric, corrupt_metric,
                           effect.reshape(shape))
    return {**result, "cells_computed": len(todo)}
