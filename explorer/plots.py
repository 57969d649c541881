"""Matplotlib figures of the explorer's outputs, for notebooks and scripts.

Every function takes either the JSON-ready dict that `Explorer` (or the HTTP API, after
`response.json()`) returns, or plain arrays, and returns a new `matplotlib.figure.Figure`
(or draws on `ax` when one is given). Figures are built without pyplot, so they work under any
backend, hold no global state, and need no display: `fig.savefig("out.png")` in a script; in
Jupyter a figure shows when it is a cell's last value (run `%matplotlib inline` first).

matplotlib is imported inside the functions so that importing this module (and `model_utils`,
which re-exports it) does not load matplotlib into the server.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from .math.forward import pca_2d

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PROJECTIONS = ("pca", "umap")


def _label(token: str) -> str:
    """A token string safe as a matplotlib label: `$` would start mathtext, newlines break rows."""
    return token.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _heatmap(ax: Axes, matrix: np.ndarray, tokens: Sequence[str]) -> None:
    """One [query, key] pattern on `ax`, token strings on both axes."""
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    labels = [_label(t) for t in tokens]
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot_attention_heatmap(attention: Mapping[str, Any] | ArrayLike, tokens: Sequence[str] | None = None,
                           *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Attention pattern(s): one heatmap for one head, a grid of heatmaps (one per head) for a layer.

    `attention` is an `/attention` response (`attention_matrix`, `tokens`, `layer`, `head`) or an
    array [seq, seq] / [n_heads, seq, seq] with `tokens` its seq token strings. Rows are queries,
    columns keys; cell (q, k) is how much position q attends to position k. `ax` is only accepted
    for a single head.
    """
    if isinstance(attention, Mapping):
        matrix = np.asarray(attention["attention_matrix"], dtype=float)
        tokens = attention["tokens"]
        head = attention.get("head")
        title = title or f"layer {attention['layer']}" + ("" if head is None else f", head {head}")
    else:
        matrix = np.asarray(attention, dtype=float)
        if tokens is None:
            raise ValueError("tokens are required when attention is an array")
    if matrix.ndim == 2:
        fig, ax = _axes(ax, (6, 5))
        _heatmap(ax, matrix, tokens)
        if title:
            ax.set_title(title)
        return fig
    if ax is not None:
        raise ValueError("ax can only be given for a single head's [seq, seq] pattern")
    from matplotlib.figure import Figure

    n_heads = matrix.shape[0]
    cols = min(n_heads, 4)
    rows = -(-n_heads // cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), layout="constrained")
    for head, sub in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        if head < n_heads:
            _heatmap(sub, matrix[head], tokens)
            sub.set_title(f"head {head}")
        else:
            sub.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def project_2d(points: ArrayLike, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Project [..., d_model] points to [..., 2] with one projection fit on all of them.

    `method` is "pca" (`math.forward.pca_2d`, equal to scikit-learn's) or "umap" (needs the optional
    `umap-learn` package; raises ImportError without it). UMAP is seeded, so repeated calls give
    the same layout.
    """
    x = np.asarray(points, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    if method == "pca":
        xy = pca_2d(flat)[0]
    elif method == "umap":
        try:
            import umap
        except ImportError as exc:
            raise ImportError("method='umap' needs umap-learn: pip install umap-learn") from exc
        # UMAP needs n_neighbors < n_points; its default (15) is too many for a short text.
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(flat) - 1), random_state=seed,
                            n_jobs=1)  # seeding forces one thread anyway; saying so silences its warning
        xy = reducer.fit_transform(flat)
    else:
        raise ValueError(f"method must be one of {', '.join(PROJECTIONS)}, got {method!r}")
    return xy.reshape(*x.shape[:-1], 2)


def plot_trajectories(trajectories: Mapping[str, Any] | ArrayLike, tokens: Sequence[str] | None = None,
                      *, method: str = "pca", ax: Axes | None = None, title: str | None = None) -> Figure:
    """Each token's path through the layers in 2D: one line per token, one marker per layer.

    `trajectories` is either a `/trace` response (already projected by the server's shared PCA;
    `method` must stay "pca") or an array of residual states [n_layers, n_tokens, d_model] (e.g.
    `run.resid[:, indices]`) that is projected here with `project_2d(..., method)`. `tokens`
    labels the array's tokens. The first layer is marked with a circle, the last with a star.
    """
    if isinstance(trajectories, Mapping):
        if method != "pca":
            raise ValueError("a /trace response is already PCA-projected; pass residual arrays for UMAP")
        keys = [str(i) for i in trajectories["token_indices"]]
        xy = np.array([[(p["x"], p["y"]) for p in trajectories["trajectories"][k]] for k in keys])
        tokens = [t["token_str"] for t in trajectories["tokens"]]
    else:
        resid = np.asarray(trajectories, dtype=np.float64)
        xy = project_2d(resid.transpose(1, 0, 2), method)  # -> [n_tokens, n_layers, 2]
        tokens = tokens if tokens is not None else [str(i) for i in range(xy.shape[0])]
    fig, ax = _axes(ax, (6, 5))
    for path, token in zip(xy, tokens):
        (line,) = ax.plot(path[:, 0], path[:, 1], marker=".", label=_label(token))
        ax.plot(*path[0], marker="o", color=line.get_color(), linestyle="none")
        ax.plot(*path[-1], marker="*", markersize=12, color=line.get_color(), linestyle="none")
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"residual stream trajectories ({method.upper()})")
    return fig


def _lens_grid(predict: Mapping[str, Any]) -> tuple[np.ndarray, list[list[dict[str, Any]]]]:
    """`predictions_by_layer` as probabilities [n_layers, top_k] and the token dicts per cell."""
    cells = [layer["top_tokens"] for layer in predict["predictions_by_layer"]]
    return np.array([[t["probability"] for t in row] for row in cells]), cells


def plot_logit_lens(predict: Mapping[str, Any], *, ax: Axes | None = None,
                    title: str | None = None) -> Figure:
    """Logit lens of one position (a `/predict` response): rows are layers (last on top), columns
    the top-k ranks; each cell names the token and is coloured by its probability."""
    probs, cells = _lens_grid(predict)
    n_layers, top_k = probs.shape
    fig, ax = _axes(ax, (1.3 * top_k + 2, 0.45 * n_layers + 1.5))
    image = ax.imshow(probs, cmap="Blues", aspect="auto", origin="lower", vmin=0.0)
    threshold = probs.max() / 2  # white text on dark cells
    for layer in range(n_layers):
        for rank in range(top_k):
            ax.text(rank, layer, _label(cells[layer][rank]["token"]), ha="center", va="center", fontsize=7,
                    color="white" if probs[layer, rank] > threshold else "black")
    ax.set_xticks(range(top_k), [f"#{r + 1}" for r in range(top_k)])
    ax.set_yticks(range(n_layers), [str(l["layer"]) for l in predict["predictions_by_layer"]])
    ax.set_xlabel("rank")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="probability")
    ax.set_title(title or f"logit lens at token {predict['token_index']} ('{_label(predict['token_str'])}')")
    return fig


def plot_token_probabilities(probabilities: Mapping[str, Any] | ArrayLike, tokens: Sequence[str] | None = None,
                             *, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Probability of a few candidate next tokens at every layer: one line per token.

    `probabilities` is a `/predict` response (lines for the last layer's top-k tokens; where a
    token is outside a layer's top-k the response does not hold its probability, so that point
    is a gap: ask for a larger top_k to fill them) or an array [n_layers, n_tokens] with `tokens`
    naming its columns. The y axis is logarithmic: lens probabilities span orders of magnitude.
    """
    if isinstance(probabilities, Mapping):
        grid, cells = _lens_grid(probabilities)
        # Match by id: distinct ids can decode to the same string (e.g. partial UTF-8 bytes).
        column = {t["token_id"]: c for c, t in enumerate(cells[-1])}
        tokens = [t["token"] for t in cells[-1]]
        probs = np.full((grid.shape[0], len(tokens)), np.nan)
        for layer, row in enumerate(cells):
            for rank, t in enumerate(row):
                if t["token_id"] in column:
                    probs[layer, column[t["token_id"]]] = grid[layer, rank]
        title = title or f"next-token probabilities at token {probabilities['token_index']}"
    else:
        probs = np.asarray(probabilities, dtype=float)
        if tokens is None:
            raise ValueError("tokens are required when probabilities is an array")
    fig, ax = _axes(ax, (6, 4))
    layers = np.arange(probs.shape[0])
    for column, token in enumerate(tokens):
        ax.plot(layers, probs[:, column], marker="o", label=_label(token))
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("probability")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "next-token probabilities by layer")
    return fig


TAXONOMY_MARKS = {"facilitating": "F", "interfering": "I", "irrelevant": "", "ambiguous": "?"}


def plot_head_grid(values: ArrayLike, *, taxonomy: Sequence[Sequence[str]] | None = None, gates: bool = False,
                   ax: Axes | None = None, title: str | None = None) -> Figure:
    """A layer x head grid [n_layers][n_heads]: an `/ablate` effect, an `/attribution_patch`
    attribution or effect change, or CHG gates (`gates=True`: a 0 .. 1 scale). Effects use a
    diverging scale centred on 0 (blue lowers the metric, red raises it). `taxonomy` (a CHG
    result's) marks each head: F facilitating, I interfering, ? ambiguous, blank irrelevant."""
    grid = np.asarray(values, dtype=float)
    n_layers, n_heads = grid.shape
    fig, ax = _axes(ax, (0.45 * n_heads + 2.2, 0.4 * n_layers + 1.4))
    if gates:
        image = ax.imshow(grid, cmap="Blues", vmin=0.0, vmax=1.0)
    else:
        limit = float(np.abs(grid).max()) or 1.0
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for (layer, head), role in np.ndenumerate(np.asarray(taxonomy if taxonomy is not None else [], dtype=object)):
        if TAXONOMY_MARKS[role]:
            ax.text(head, layer, TAXONOMY_MARKS[role], ha="center", va="center", fontsize=9, fontweight="bold",
                    color="darkorange")
    ax.set_xticks(range(n_heads), [f"H{h}" for h in range(n_heads)], fontsize=8)
    ax.set_yticks(range(n_layers), [f"L{l}" for l in range(n_layers)], fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.8, label="gate" if gates else "metric change")
    ax.set_title(title or ("CHG gates" if gates else "effect per head"))
    return fig


def plot_attribution_vs_patching(attribution: Mapping[str, Any], *, ax: Axes | None = None,
                                 title: str | None = None) -> Figure:
    """The attribution estimate against real patching, one point per cell (coloured by layer),
    from an `/attribution_patch` response made with `compare: true`; the line is y = x."""
    if "exact_effect" not in attribution:
        raise ValueError("the response has no exact_effect: request it with compare=True")
    estimate = np.asarray(attribution["effect"], dtype=float)
    exact = np.asarray(attribution["exact_effect"], dtype=float)
    layers = np.broadcast_to(np.arange(len(exact)).reshape((-1,) + (1,) * (exact.ndim - 1)), exact.shape)
    fig, ax = _axes(ax, (5, 4.5))
    points = ax.scatter(exact.ravel(), estimate.ravel(), c=layers.ravel(), cmap="viridis", s=18)
    lo, hi = min(exact.min(), estimate.min()), max(exact.max(), estimate.max())
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("real patching: metric after the patch")
    ax.set_ylabel("attribution estimate")
    fig.colorbar(points, ax=ax, label="layer")
    r = attribution["pearson"]
    ax.set_title(title or f"{attribution['site']}: Pearson r = {'n/a' if r is None else f'{r:.3f}'}, "
                          f"max abs error {attribution['max_abs_error']:.3g}")
    return fig
LENS_SHADES = {"probability": "top-1 probability", "entropy": "entropy (nats)", "kl": "KL(final || layer) (nats)"}


def plot_lens_grid(lens: Mapping[str, Any], shade: str = "probability", *, ax: Axes | None = None,
                   title: str | None = None) -> Figure:
    """Logit lens grid (a `/lens` response): rows are layers (last on top), columns the positions;
    each cell names the layer's top-1 next-token guess and is coloured by `shade`: "probability"
    (of that guess), "entropy" of the layer's distribution, or "kl" (KL(final || layer))."""
    if shade not in LENS_SHADES:
        raise ValueError(f"shade must be one of {', '.join(LENS_SHADES)}, got {shade!r}")
    top = lens["top"]
    values = np.array({"probability": [[cell[0]["probability"] for cell in row] for row in top],
                       "entropy": lens["entropy"], "kl": lens["kl_to_final"]}[shade], dtype=float)
    n_layers, n_pos = values.shape
    fig, ax = _axes(ax, (0.9 * n_pos + 2.5, 0.5 * n_layers + 1.8))
    image = ax.imshow(values, cmap="Blues", aspect="auto", origin="lower", vmin=0.0,
                      vmax=1.0 if shade == "probability" else None)
    threshold = (image.norm.vmax or 1.0) / 2  # white text on dark cells
    for layer in range(n_layers):
        for col in range(n_pos):
            ax.text(col, layer, _label(top[layer][col][0]["token"]), ha="center", va="center", fontsize=7,
                    color="white" if values[layer, col] > threshold else "black")
    tokens = lens["tokens"]
    ax.set_xticks(range(n_pos), [f"{_label(tokens[p])}\n#{p}" for p in lens["positions"]], fontsize=8)
    ax.set_yticks(range(n_layers), [str(l) for l in range(n_layers)])
    ax.set_xlabel("position (input token)")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label=LENS_SHADES[shade])
    ax.set_title(title or "logit lens: top-1 next-token guess by layer")
    return fig


def plot_target_trajectory(lens: Mapping[str, Any], position: int | None = None, *, ax: Axes | None = None,
                           title: str | None = None) -> Figure:
    """A target's probability (left axis) and rank (right axis, log scale, rank 1 on top) at
    every layer for one position of a `/lens` response made with `target`; the crossover layer
    (from which the target stays top-1) is marked. `position` defaults to the last one asked."""
    target = lens.get("target")
    if not target:
        raise ValueError("the /lens response has no target: request it with a target token")
    positions = list(lens["positions"])
    position = positions[-1] if position is None else position
    if position not in positions:
        raise ValueError(f"position {position} is not among the response's positions {positions}")
    k = positions.index(position)
    probs = np.array([row[k] for row in target["probability"]], dtype=float)
    ranks = np.array([row[k] for row in target["rank"]], dtype=float)
    crossover = target["crossover_layer"][k]
    layers = np.arange(len(probs))
    fig, ax = _axes(ax, (6, 4))
    ax.plot(layers, probs, marker="o", color="tab:blue", label="probability")
    ax.set_ylim(0, 1)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("probability", color="tab:blue")
    twin = ax.twinx()
    twin.plot(layers, ranks, marker="s", linestyle="--", color="tab:orange", label="rank")
    twin.set_yscale("log")
    twin.set_ylim(max(ranks.max() * 2, 10), 0.8)  # rank 1 on top
    twin.set_ylabel("rank (log scale, 1 = top)", color="tab:orange")
    if crossover is not None:
        ax.axvline(crossover, color="black", linestyle=":", label=f"crossover (layer {crossover})")
    ax.legend(handles=ax.get_lines() + twin.get_lines(), fontsize=8, loc="center left")
    ax.set_title(title or f"'{_label(target['token'])}' after token {position} "
                          f"('{_label(lens['tokens'][position])}')"
                          + ("" if crossover is not None else ": never top-1 at the end"))
    return fig


def plot_dla(dla: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """Direct logit attribution (a `/dla` response): the attention and MLP output of each layer
    as bars (embedding and biases noted in the title), and each head as a layers x heads heatmap
    in diverging colours (blue raises the metric, red lowers it)."""
    from matplotlib.figure import Figure

    attn, mlp = np.asarray(dla["attn"], dtype=float), np.asarray(dla["mlp"], dtype=float)
    heads = np.asarray(dla["heads"], dtype=float)
    n_layers, n_heads = heads.shape
    fig = Figure(figsize=(6 + 0.4 * n_heads, 0.35 * n_layers + 3), layout="constrained")
    bars, heat = fig.subplots(1, 2, width_ratios=[1.3, 1])
    layers = np.arange(n_layers)
    bars.bar(layers - 0.2, attn, width=0.4, label="attention", color="tab:blue")
    bars.bar(layers + 0.2, mlp, width=0.4, label="MLP", color="tab:green")
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_xticks(layers)
    bars.set_xlabel("layer")
    bars.set_ylabel("contribution to the metric")
    bars.legend(fontsize=8)
    bars.set_title(f"embed {dla['embed']:+.3f}, bias {dla['bias']:+.3f}, total {dla['total']:+.3f}", fontsize=9)
    bound = float(np.abs(heads).max()) or 1.0
    image = heat.imshow(heads, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    heat.set_xticks(range(n_heads))
    heat.set_yticks(layers)
    heat.set_xlabel("head")
    heat.set_ylabel("layer")
    heat.set_title("per head", fontsize=9)
    fig.colorbar(image, ax=heat, shrink=0.8)
    answer = dla["answer"]["token"]
    distractor = dla.get("distractor")
    metric = (f"logit('{_label(answer)}') - logit('{_label(distractor['token'])}')" if distractor
              else f"logit('{_label(answer)}')")
    fig.suptitle(title or f"direct logit attribution of {metric} after token {dla['position']}")
    return fig


def plot_patching(patch: Mapping[str, Any], position: int | None = None, *, ax: Axes | None = None,
                  title: str | None = None) -> Figure:
    """A `/patch` response as a diverging heatmap of its recovery (1 = the clean behaviour
    restored, 0 = no effect; blue above 0, red below), rows the layers (layer 0 on top), columns the
    clean tokens (`resid_pre`, `attn_out`, `mlp_out`) or the heads (`heads`). A
    `heads_by_position` grid is drawn layer x head at `position` (default: the position where the
    heads' patches move the metric most). When recovery is null (equal clean and corrupt metrics)
    the change of the raw metric is drawn instead."""
    recovered = patch["recovery"] is not None
    base = patch["corrupt_metric"] if patch["direction"] == "denoise" else patch["clean_metric"]
    grid = np.asarray(patch["recovery"] if recovered else patch["effect"], dtype=float) - (0.0 if recovered else base)
    site = patch["site"]
    if site == "heads_by_position":
        if position is None:
            position = int(np.abs(grid).sum(axis=(0, 1)).argmax())
        grid = grid[:, :, position]
    elif position is not None:
        raise ValueError("position is only for a heads_by_position response")
    n_layers, n_cols = grid.shape
    heads = site.startswith("heads")
    fig, ax = _axes(ax, (max(0.45 * n_cols + 2.5, 5), 0.4 * n_layers + (1.6 if heads else 2.4)))
    limit = max(float(np.abs(grid).max()), 1.0 if recovered else 0.0) or 1.0
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    columns = patch["columns"] if heads else [_label(t) for t in patch["tokens_clean"]]
    ax.set_xticks(range(n_cols), columns, rotation=0 if heads else 90, fontsize=8)
    if not heads:  # mark the positions where the two prompts differ
        for label, clean, corrupt in zip(ax.get_xticklabels(), patch["tokens_clean"], patch["tokens_corrupt"]):
            if clean != corrupt:
                label.set_color("tab:red")
    ax.set_yticks(range(n_layers), patch["rows"], fontsize=8)
    ax.set_xlabel("head" if heads else "position (clean token; red: the prompts differ)")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, shrink=0.8, label="recovery" if recovered else "metric change")
    answer = _label(patch["answer"]["token"])
    metric = (f"logit('{answer}') - logit('{_label(patch['distractor']['token'])}')"
              if patch["metric"] == "logit_diff" else f"log P('{answer}')")
    where = "" if position is None else f" at position {position} ('{_label(patch['tokens_clean'][position])}')"
    ax.set_title(title or f"{site}{where}, {patch['direction']}: {metric}", fontsize=10)
    return fig


TRACE_CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}  # ROME's colours


def plot_causal_trace(traces: Sequence[Mapping[str, Any]] | Mapping[str, Any], *, title: str | None = None) -> Figure:
    """ROME's causal-tracing figure from `/causal_trace` responses (one, or a list such as the
    resid, mlp and attn traces of one prompt): one panel each, side by side, tokens down (the
    subject's starred) and layers across, each cell the answer's probability after restoring
    that state into the noised run."""
    from matplotlib.figure import Figure

    traces = [traces] if isinstance(traces, Mapping) else list(traces)
    first = traces[0]
    tokens, subject = first["tokens"], set(first["subject_positions"])
    n_layers = len(first["scores"])
    fig = Figure(figsize=(0.25 * n_layers * len(traces) + 2.5 * len(traces) + 1.5, 0.32 * len(tokens) + 2),
                 layout="constrained")
    for ax, trace in zip(fig.subplots(1, len(traces), squeeze=False)[0], traces):
        scores = np.asarray(trace["scores"], dtype=float).T  # [seq, n_layers]
        image = ax.imshow(scores, cmap=TRACE_CMAPS[trace["kind"]], aspect="auto",
                          vmin=min(trace["corrupt_prob"], float(scores.min())))
        ax.set_yticks(range(len(tokens)), [f"{_label(t)}*" if p in subject else _label(t)
                                           for p, t in enumerate(tokens)], fontsize=8)
        ax.set_xlabel("layer")
        window = "" if trace["window"] is None else f" (window {trace['window']})"
        ax.set_title(f"restore {trace['kind']}{window}", fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8, label=f"P('{_label(trace['answer']['token'])}')")
    fig.suptitle(title or f"causal tracing: clean p = {first['clean_prob']:.3g}, noised p = "
                          f"{first['corrupt_prob']:.3g} (* = subject, noised)")
    return fig
