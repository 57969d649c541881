"""ROME-style causal tracing (`operations.causal_trace`; Meng et al. 2022, "Locating and Editing Factual
Associations in GPT").

Corrupt the subject: add Gaussian noise to the subject tokens' input embeddings (the residual
stream entering block 0), `samples` draws. Then restore one clean state per cell in every noisy
run and read the answer's probability, averaged over the draws:

- `resid`: the residual stream leaving block `l` at one position;
- `mlp` / `attn`: that sublayer's output at one position, in a window of `window` layers around
  `l` (clipped at the ends), all restored together, as ROME does.

Noise is reproducible: `torch.Generator().manual_seed(seed)` then
`torch.randn(samples, n_subject, d_model, generator=g) * noise`, drawn on the CPU in float32,
added in the subject positions' order. Cells before the first subject token are not run: in a
causal model the noise cannot reach them, so restoring them changes nothing (score = corrupt).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Generator

import numpy as np
import torch

from . import replay
from .forward import readout
from .steps import over_chunks

_SITE = {"mlp": "mlp_out", "attn": "attn_out"}


@functools.lru_cache(maxsize=8)
def embedding_std(bridge: Any) -> float:
    """Standard deviation of the model's token embeddings over the whole vocabulary, as the
    embedding module outputs them (Gemma's scaling included). Streamed in blocks of ids: a
    128k-token vocabulary at once would be a 1 GB tensor."""
    d_vocab = int(bridge.cfg.d_vocab)
    total = squares = 0.0
    count = 0
    for begin in range(0, d_vocab, 8192):
        ids = torch.arange(begin, min(begin + 8192, d_vocab), device=bridge.cfg.device)[None]
        e = bridge.embed(ids).double()
        total += float(e.sum())
        squares += float((e * e).sum())
        count += e.numel()
    mean = total / count
    return float(np.sqrt(max(squares / count - mean * mean, 0.0)))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together around `layer` (ROME's window, clipped at the ends)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def noise_draws(samples: int, n_subject: int, d_model: int, scale: float, seed: int) -> torch.Tensor:
    """The noise added to the subject's embeddings [samples, n_subject, d_model] (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_subject, d_model, generator=g, dtype=torch.float32) * scale


def noisy_states(bridge: Any, clean: replay.Acts, positions: list[int], scale: float, samples: int,
                 seed: int, budget: replay.Budget) -> Generator[float, None, torch.Tensor]:
    """Every block's input in each noisy run [n_layers + 1, samples, seq, d_model], a group of
    runs at a time (at most `budget.rows`, and as many as one block of fits `budget.work`),
    yielding between pieces of `budget.work`."""
    resid = clean.resid
    out = torch.empty(resid.shape[0], samples, *resid.shape[1:], dtype=resid.dtype, device=resid.device)
    draws = noise_draws(samples, len(positions), resid.shape[-1], scale, seed)
    group = max(1, min(budget.rows, int(budget.work // resid.shape[1])))  # a block of them fits a chunk
    for begin in range(0, samples, group):
        end = min(samples, begin + group)
        states = resid[0].expand(end - begin, -1, -1).clone()
        states[:, positions] += draws[begin:end].to(states.device, states.dtype)
        yield from replay.run_states(bridge, clean.blocks, states, out[:, begin:end], budget)
    return out


def probability(logits: torch.Tensor, answer: int) -> torch.Tensor:
    """P(answer) of logits [..., d_vocab] -> [...] (float32)."""
    return logits.float().softmax(-1)[..., answer]


def corrupt_probability(bridge: Any, noisy: torch.Tensor, answer: int) -> np.float32:
    """P(answer) after the prompt, averaged over the noisy runs (float32 like the scores)."""
    return np.float32(probability(readout(bridge, noisy[-1, :, -1:, :])[:, 0], answer).mean().cpu())


def trace_scores(bridge: Any, clean: replay.Acts, noisy: torch.Tensor, answer: int, kind: str, first: int,
                 window: int, corrupt_prob: np.float32, budget: replay.Budget) -> Generator[float, None, np.ndarray]:
    """P(answer) after restoring each cell [n_layers, seq], averaged over the noisy runs; cells
    before position `first` (the first subject token) keep `corrupt_prob`. Runs in chunks; a
    cell's noisy runs are split over several when one block of all of them would exceed a
    chunk's work (long texts)."""
    n_layers, seq = clean.n_layers, len(clean.token_ids)
    samples = noisy.shape[1]
    group = max(1, min(samples, int(budget.work // seq)))  # noisy runs replayed together
    start: Callable[[tuple[int, int]], int] = (
        (lambda c: c[0] + 1) if kind == "resid" else (lambda c: window_layers(c[0], window, n_layers)[0]))
    cells = sorted(((l, p) for l in range(n_layers) for p in range(first, seq)), key=start)
    units = [(cell, range(s, min(s + group, samples))) for cell in cells for s in range(0, samples, group)]
    chunks = replay.plan_chunks([start(cell) for cell, _ in units], group, seq, n_layers, budget)
    sums = np.zeros((n_layers, seq), dtype=np.float64)

    def run(chunk: tuple[int, int]) -> Generator[float, None, None]:
        part = units[chunk[0]:chunk[1]]
        starts, edits = _rows(kind, part, start, clean, noisy, window, n_layers)
        logits = yield from replay.run_rows(bridge, clean.blocks, starts, edits, budget)
        p = probability(logits, answer).cpu().numpy()
        row = 0
        for (layer, position), runs in part:
            sums[layer, position] += p[row:row + len(runs)].sum(dtype=np.float64)
            row += len(runs)

    yield from over_chunks(chunks, run)
    scores = np.full((n_layers, seq), corrupt_prob, dtype=np.float32)
    scores[:, first:] = (sums[:, first:] / samples).astype(np.float32)
    return scores


Unit = tuple[tuple[int, int], range]  # a cell (layer, position) and the noisy runs it replays


def _rows(kind: str, units: list[Unit], start: Any, clean: replay.Acts, noisy: torch.Tensor, window: int,
          n_layers: int) -> tuple[list[tuple[int, torch.Tensor]], list[replay.Edit]]:
    """The replay plan of `units` (sorted by start layer): one row per noisy run. A window's
    restores are gathered into one edit per layer."""
    starts: list[tuple[int, torch.Tensor]] = []
    restores: dict[int, list[tuple[range, int]]] = {}  # layer -> (rows, position) of each unit
    row = 0
    for cell, runs in units:
        layer, position = cell
        first = start(cell)
        states = noisy[first, runs.start:runs.stop]  # [runs, seq, d_model]
        if kind == "resid":
            states = states.clone()
            states[:, position] = clean.resid[first, position]
        else:
            for k in window_layers(layer, window, n_layers):
                restores.setdefault(k, []).append((range(row, row + len(runs)), position))
        if starts and starts[-1][0] == first:
            starts[-1] = (first, torch.cat([starts[-1][1], states]))
        else:
            starts.append((first, states))
        row += len(runs)
    edits = []
    for k, found in restores.items():
        rows = torch.tensor([r for rows, _ in found for r in rows])
        positions = torch.tensor([p for rows, p in found for _ in rows])
        site = _SITE[kind]
        edits.append(replay.Edit(replay.SITE_HOOKS[site].format(k), rows, clean.site(site)[k, positions],
                                 positions=positions))
    return starts, edits
