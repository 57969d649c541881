"""Activation patching: which layer, position or head carries the difference between a clean and
a corrupt prompt (`operations.patch`; ablation reuses the same cells).

Denoising (the default) runs the corrupt prompt and patches in one clean activation per cell;
noising runs the clean prompt and patches in a corrupt one. Every cell is one row of a batched
replay (`replay.run_rows`) starting at the cell's layer; a cell whose patched activation equals
the base run's (positions before the prompts first differ, in a causal model) is not run: its
metric is the base run's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, TypeVar

import numpy as np
import torch

from . import replay
from .forward import readout
from .steps import over_chunks
from .target import Target

T = TypeVar("T")

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


def cell_value(acts: replay.Acts, site: str, cell: Cell) -> torch.Tensor:
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


def base_and_source(direction: str, clean: T, corrupt: T) -> tuple[T, T]:
    """(the run that is patched, the run patched in): denoise runs corrupt with clean
    activations, noise runs clean with corrupt ones."""
    return (corrupt, clean) if direction == "denoise" else (clean, corrupt)


def changed(site: str, cells: list[Cell], base: replay.Acts, source: replay.Acts) -> list[int]:
    """Indices of the cells whose patched activation differs from the base run's (the others
    would replay the base run: their metric is the base metric)."""
    return [i for i, c in enumerate(cells) if not torch.equal(cell_value(base, site, c), cell_value(source, site, c))]


def pair_metrics(bridge: Any, target: Target, clean: replay.Acts,
                 corrupt: replay.Acts) -> tuple[np.float32, np.float32]:
    """The metric on each unpatched prompt, as float32 like the grids (so a cell equal to one
    serializes identically)."""
    return (np.float32(target.metric(final_logits(bridge, clean)).cpu()),
            np.float32(target.metric(final_logits(bridge, corrupt)).cpu()))


def run_cells(bridge: Any, site: str, cells: list[Cell], base: replay.Acts, source: replay.Acts,
              target: Target, budget: replay.Budget) -> Generator[float, None, np.ndarray]:
    """The metric after each cell's replacement [len(cells)]: `base` run with the cell's
    activation taken from `source`. Cells must be sorted by layer. Runs in chunks (batched
    replays), yielding the progress before each."""
    seq, n_layers = base.resid.shape[1], int(bridge.cfg.n_layers)
    out = np.empty(len(cells), dtype=np.float32)
    chunks = replay.plan_chunks([c.layer for c in cells], 1, seq, n_layers, budget)

    def run(chunk: tuple[int, int]) -> Generator[float, None, None]:
        begin, end = chunk
        starts, edits = cell_rows(site, cells[begin:end], base, source)
        logits = yield from replay.run_rows(bridge, base.blocks, starts, edits, budget)
        out[begin:end] = target.metric(logits).cpu().numpy()

    yield from over_chunks(chunks, run)
    return out
