"""ROME-style causal tracing (`POST /causal_trace`; Meng et al. 2022, "Locating and Editing Factual
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
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from . import replay
from .analysis import InvalidRequest, check_choice, check_index, readout
from .patching import final_logits
from .targets import recovery

if TYPE_CHECKING:
    from .service import Explorer

KINDS = ("resid", "mlp", "attn")
DEFAULT_SAMPLES = 10
MAX_SAMPLES = 50
DEFAULT_WINDOW = 10
NOISE_SCALE = 3.0  # default noise = NOISE_SCALE x the standard deviation of the token embeddings
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


def subject_positions(ex: "Explorer", text: str, subject: str | Sequence[int]) -> list[int]:
    """Token positions of the subject: a substring of `text` (every token overlapping it), or a
    list of positions. 400 if absent, ambiguous, empty or out of range."""
    ids, _ = ex.tokens(text)
    if not isinstance(subject, str):
        if not subject:
            raise InvalidRequest("subject must not be an empty list")
        for p in subject:
            check_index("subject[]", p, len(ids))
        if len(set(subject)) != len(subject):
            raise InvalidRequest("subject must not contain duplicate positions")
        return sorted(subject)
    if not subject:
        raise InvalidRequest("subject must be a non-empty substring of text or a list of token positions")
    found = text.count(subject)
    if found != 1:
        raise InvalidRequest(f"subject {subject!r} occurs {found} times in text; it must occur exactly "
                             "once, or give its token positions as a list")
    begin = text.index(subject)
    end = begin + len(subject)
    offset = len(ids) - len(ex.offsets(text))  # BOS, when the model prepends one
    return [offset + i for i, (a, b) in enumerate(ex.offsets(text)) if a < end and b > begin]


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together around `layer` (ROME's window, clipped at the ends)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def noise_draws(samples: int, n_subject: int, d_model: int, scale: float, seed: int) -> torch.Tensor:
    """The noise added to the subject's embeddings [samples, n_subject, d_model] (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_subject, d_model, generator=g, dtype=torch.float32) * scale


def causal_trace(ex: "Explorer", text: str, subject: str | Sequence[int], answer: Any, kind: str,
                 noise: float | None, samples: int, seed: int, window: int | None) -> Iterator[Any]:
    """Validate a /causal_trace request now (400s before any job starts); return its job's steps."""
    ex.require_causal("POST /causal_trace")
    check_choice("kind", kind, KINDS)
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidRequest(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    n_layers = int(ex.model.cfg.n_layers)
    window = min(DEFAULT_WINDOW, n_layers) if window is None else window
    if not 1 <= window <= n_layers:
        raise InvalidRequest(f"window must be between 1 and {n_layers} (n_layers), got {window}")
    if noise is not None and not (np.isfinite(noise) and noise > 0):
        raise InvalidRequest(f"noise must be a positive number, got {noise}")
    if not 0 <= seed < 2**63:
        raise InvalidRequest(f"seed must be between 0 and {2**63 - 1}, got {seed}")
    positions = subject_positions(ex, text, subject)
    answer_id = None if answer is None else ex.target(answer, None).answer
    return _trace_steps(ex, text, positions, answer_id, kind, noise, samples, seed, window)


def _noisy_resid(ex: "Explorer", clean: replay.Acts, positions: list[int], scale: float, samples: int,
                 seed: int) -> torch.Tensor:
    """Every block's input in each noisy run [n_layers + 1, samples, seq, d_model] (cached)."""
    key = ("noisy", tuple(clean.token_ids.tolist()), tuple(positions), scale, samples, seed)

    def compute() -> torch.Tensor:
        states = clean.resid[0].expand(samples, -1, -1).clone()
        draws = noise_draws(samples, len(positions), states.shape[-1], scale, seed)
        states[:, positions] += draws.to(states.device, states.dtype)
        return replay.run_states(ex.model.bridge, clean.blocks, states)

    return ex.cache.get_or_compute(key, compute)


def _trace_steps(ex: "Explorer", text: str, positions: list[int], answer: int | None, kind: str,
                 noise: float | None, samples: int, seed: int, window: int) -> Iterator[Any]:
    bridge, cfg = ex.model.bridge, ex.model.cfg
    n_layers = int(cfg.n_layers)
    clean = ex.acts(text)
    clean_probs = final_logits(bridge, clean).float().softmax(-1)
    if answer is None:
        answer = int(clean_probs.argmax())
    scale = NOISE_SCALE * embedding_std(bridge) if noise is None else float(noise)
    noisy = _noisy_resid(ex, clean, positions, scale, samples, seed)
    prob = lambda logits: logits.float().softmax(-1)[:, answer]  # noqa: E731
    # float32 like the scores, so a cell equal to a probability serializes identically
    clean_prob = np.float32(clean_probs[answer].cpu())
    corrupt_prob = np.float32(prob(readout(bridge, noisy[-1, :, -1:, :])[:, 0]).mean().cpu())
    seq = len(clean.token_ids)
    scores = np.full((n_layers, seq), corrupt_prob, dtype=np.float32)
    cells = [(l, p) for l in range(n_layers) for p in range(positions[0], seq)]
    start = (lambda c: c[0] + 1) if kind == "resid" else (lambda c: window_layers(c[0], window, n_layers)[0])
    cells.sort(key=start)
    chunks = replay.plan_chunks([start(c) for c in cells], samples, seq, n_layers,
                                replay.row_budget(cfg, seq, str(cfg.device)))
    yield 0.0
    for done, (begin, end) in enumerate(chunks, 1):
        chunk = cells[begin:end]
        starts, edits = _rows(kind, chunk, start, clean, noisy, samples, window, n_layers)
        p = prob(replay.run_rows(bridge, clean.blocks, starts, edits)).reshape(len(chunk), samples).mean(1)
        for (layer, position), value in zip(chunk, p.cpu().numpy()):
            scores[layer, position] = value
        if done < len(chunks):
            yield done / len(chunks)
    rec, warning = recovery(scores, clean_prob, corrupt_prob)
    result: dict[str, Any] = {
        "tokens": list(ex.tokens(text)[1]), "subject_positions": positions, "kind": kind,
        "answer": {"token": ex.vocab_strs[answer], "token_id": answer},
        "clean_prob": clean_prob, "corrupt_prob": corrupt_prob, "scores": scores, "recovery": rec,
        "noise": scale, "samples": samples, "seed": seed, "window": window if kind != "resid" else None,
    }
    if warning:
        result["warning"] = warning
    return result


def _rows(kind: str, cells: list[tuple[int, int]], start: Any, clean: replay.Acts, noisy: torch.Tensor,
          samples: int, window: int, n_layers: int) -> tuple[list[tuple[int, torch.Tensor]], list[replay.Edit]]:
    """The replay plan of `cells` (sorted by start layer): `samples` rows each. A window's
    restores are gathered into one edit per layer."""
    starts: list[tuple[int, torch.Tensor]] = []
    restores: dict[int, list[tuple[int, int]]] = {}  # layer -> (first row, position) of each cell
    for i, cell in enumerate(cells):
        layer, position = cell
        first = start(cell)
        states = noisy[first]  # [samples, seq, d_model]
        if kind == "resid":
            states = states.clone()
            states[:, position] = clean.resid[first, position]
        else:
            for k in window_layers(layer, window, n_layers):
                restores.setdefault(k, []).append((i * samples, position))
        if starts and starts[-1][0] == first:
            starts[-1] = (first, torch.cat([starts[-1][1], states]))
        else:
            starts.append((first, states))
    edits = []
    for k, found in restores.items():
        rows = torch.tensor([r + s for r, _ in found for s in range(samples)])
        positions = torch.tensor([p for _, p in found for _ in range(samples)])
        site = _SITE[kind]
        edits.append(replay.Edit(replay.SITE_HOOKS[site].format(k), rows, clean.site(site)[k, positions],
                                 positions=positions))
    return starts, edits
