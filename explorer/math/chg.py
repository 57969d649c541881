"""Causal Head Gating (`operations.chg`, `POST /jobs/chg`; Nam et al., NeurIPS 2025, arXiv 2505.13737).

One gate per head, `G = sigmoid(logit)` in [0, 1], scales the head's output before the output
projection (`hook_z`); the model's weights stay frozen. The gates minimise the targets'
cross-entropy, `mean over texts of -log P(target | text)` read at each text's last position, in
three stages of `steps` Adam updates each:

1. `unregularized`: from a seeded random start (gates uniform in (0, 1)), the loss alone;
2. `toward_zero`: from stage 1's gates, loss + lambda * sum(clip(logit)): pressure to remove (G-);
3. `toward_one`: from stage 1's gates, loss - lambda * sum(clip(logit)): pressure to keep (G+).

`clip` is to [-LOGIT_CLIP, LOGIT_CLIP], as published, so the penalty's gradient on a head is
exactly lambda while its logit is inside: a head resists the pressure only where moving its gate
changes the loss faster than that. Unlike the reference code, the logits themselves are kept
inside the clip after every update (gates in [0.018, 0.982]); otherwise a gate that starts or
drifts past it is never reached by the penalty again and keeps whatever value it had.

Taxonomy, from the final G- and G+ with THRESHOLD = 0.5:
- facilitating: kept even under pressure to remove (G- >= 0.5, and G+ >= 0.5): the task needs it;
- interfering: removed even under pressure to keep (G+ < 0.5, and G- < 0.5): it hurts the task;
- irrelevant: follows the pressure (G+ >= 0.5, G- < 0.5);
- ambiguous: the opposite (G+ < 0.5 <= G-), kept only when pushed out and removed only when
  pushed in: its role depends on which other heads are on (or the stages did not converge).

Each chunk on the model worker is one micro-batch of texts (a training step may span several, its
gradient accumulated), so interactive requests are served between them. Only the gate logits are
differentiated (`torch.autograd.grad`): no model parameter gets a `.grad`, and grad mode is on
only inside each chunk's computation.
"""
from __future__ import annotations

from typing import Any, Generator, Sequence

import numpy as np
import torch

from . import replay
from .forward import readout, resid_hook, run_until
from .steps import Steps
from .target import Target

STAGES = (("unregularized", 0.0), ("toward_zero", 1.0), ("toward_one", -1.0))  # sign of lambda in the loss
LOGIT_CLIP = 4.0
THRESHOLD = 0.5
LABELS = ("facilitating", "interfering", "irrelevant", "ambiguous")


def micro_batches(ids: Sequence[Sequence[int]], cfg: Any, budget: replay.Budget) -> list[list[int]]:
    """Texts (indices) grouped by length into batches of about one chunk of work each: a forward
    and backward pass over at most the block work of a chunk (`budget.work`)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    tokens = budget.work / int(cfg.n_layers)
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * len(ids[i]) <= tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _padded(ids: Sequence[Sequence[int]], rows: list[int], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [rows, longest], last real position of each row [rows]). Rows are padded after
    their end by repeating their last token: in a causal model no real position sees the padding."""
    longest = max(len(ids[i]) for i in rows)
    tokens = torch.tensor([list(ids[i]) + [ids[i][-1]] * (longest - len(ids[i])) for i in rows], device=device)
    return tokens, torch.tensor([len(ids[i]) - 1 for i in rows], device=device)


def nll_sum(bridge: Any, tokens: torch.Tensor, last: torch.Tensor, answers: Sequence[int],
            gates: torch.Tensor | None) -> torch.Tensor:
    """Sum over rows of -log P(answer) after each row's last real token, every head's `hook_z`
    scaled by its gate (gates [n_layers, n_heads]; None: the model as it is)."""
    n_layers = int(bridge.cfg.n_layers)
    final: list[torch.Tensor] = []
    stop = resid_hook(n_layers - 1)
    hooks = [(stop, lambda tensor, hook: final.append(tensor))]
    if gates is not None:  # z: [batch, pos, n_heads, d_head]
        hooks += [(replay.SITE_HOOKS["z"].format(l), lambda z, hook, g=gates[l]: z * g.to(z.device, z.dtype)[:, None])
                  for l in range(n_layers)]
    run_until(bridge, tokens, hooks, stop)
    states = final[0][torch.arange(len(last), device=last.device), last]  # [rows, d_model]
    logits = readout(bridge, states[:, None, :])[:, 0]
    return -sum(Target(a).metric(row) for a, row in zip(answers, logits))


def taxonomy(toward_zero: np.ndarray, toward_one: np.ndarray) -> list[list[str]]:
    """Each head's role from its final gates under pressure to remove (G-) and to keep (G+)."""
    kept_out, kept_in = toward_zero >= THRESHOLD, toward_one >= THRESHOLD
    index = np.where(kept_out, np.where(kept_in, 0, 3), np.where(kept_in, 2, 1))
    return [[LABELS[i] for i in row] for row in index]


def train(bridge: Any, ids: list[tuple[int, ...]], answers: list[int], steps: int, lr: float, lam: float,
          seed: int, budget: replay.Budget) -> Steps:
    """The three stages of gate training, one micro-batch per chunk; returns the gates, losses and
    taxonomy (the JSON-ready fields of a CHG result but the targets)."""
    cfg = bridge.cfg
    n_layers, n_heads, device = int(cfg.n_layers), int(cfg.n_heads), cfg.device
    with torch.inference_mode(False):  # autograd saves the token ids (the embedding's backward)
        batches = [(_padded(ids, rows, device), [answers[i] for i in rows]) for rows in micro_batches(ids, cfg, budget)]
    total = len(STAGES) * steps * len(batches)
    status: dict[str, Any] = {"progress": 0.0, "stage": STAGES[0][0], "step": 0, "steps": steps, "loss": None}

    def mean_loss(gates: torch.Tensor | None) -> Generator[dict[str, Any], None, float]:
        """The cross-entropy over every text with these gates: forward passes, a micro-batch per chunk."""
        loss = 0.0
        for b, ((tokens, last), targets) in enumerate(batches):
            if b:
                yield status
            loss += float(nll_sum(bridge, tokens, last, targets, gates))
        return loss / len(ids)

    uniform = torch.rand(n_layers, n_heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    start = torch.logit(uniform.clamp(1e-6, 1 - 1e-6)).clamp(-LOGIT_CLIP, LOGIT_CLIP).float().to(device)
    result: dict[str, Any] = {"stages": [name for name, _ in STAGES], "gates": {}, "loss": {},
                              "loss_history": {}, "loss_ungated": (yield from mean_loss(None))}
    done = 0
    for stage, sign in STAGES:
        with torch.inference_mode(False):
            logits = start.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([logits], lr=lr)
        history: list[float] = []
        for step in range(1, steps + 1):
            cross_entropy = 0.0
            for b, ((tokens, last), targets) in enumerate(batches):
                with torch.inference_mode(False), torch.enable_grad():
                    loss = nll_sum(bridge, tokens, last, targets, logits.sigmoid()) / len(ids)
                    cross_entropy += float(loss.detach())
                    if b == 0 and sign:
                        loss = loss + sign * lam * logits.clamp(-LOGIT_CLIP, LOGIT_CLIP).sum()
                    (grad,) = torch.autograd.grad(loss, [logits])
                    logits.grad = grad if b == 0 else logits.grad + grad
                    if b == len(batches) - 1:
                        optimizer.step()
                        logits.grad = None
                        with torch.no_grad():
                            logits.clamp_(-LOGIT_CLIP, LOGIT_CLIP)
                done += 1
                if b == len(batches) - 1:
                    history.append(cross_entropy)
                status.update(progress=done / total, stage=stage, step=step, loss=history[-1] if history else None)
                yield status
        gates = logits.detach().sigmoid()
        result["gates"][stage] = gates.cpu().numpy()
        result["loss"][stage] = yield from mean_loss(gates)
        result["loss_history"][stage] = np.array(history, dtype=np.float32)
        if stage == "unregularized":
            start = logits.detach().clone()
    labels = taxonomy(result["gates"]["toward_zero"], result["gates"]["toward_one"])
    return {
        **result, "taxonomy": labels,
        "counts": {label: sum(row.count(label) for row in labels) for label in LABELS},
        "threshold": THRESHOLD, "logit_clip": LOGIT_CLIP,
        "n_texts": len(ids),
        "steps": steps, "lr": lr, "lambda": lam, "seed": seed,
        "rows": [f"L{l}" for l in range(n_layers)], "columns": [f"H{h}" for h in range(n_heads)],
    }
