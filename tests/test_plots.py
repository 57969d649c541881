"""explorer.plots on the tiny model: each figure holds one artist per item of the data it was given."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from model_utils import (
    Explorer,
    plot_attention_heatmap,
    plot_logit_lens,
    plot_token_probabilities,
    plot_trajectories,
    project_2d,
)
from tests.helpers import FACT, PAIR, TEXT

HAVE_UMAP = importlib.util.find_spec("umap") is not None


@pytest.fixture(scope="module")
def explorer(tiny_model) -> Explorer:
    return Explorer(tiny_model)


def http_json(payload: dict) -> dict:
    """What a client gets back from the API: nested lists instead of numpy arrays."""
    import orjson

    return json.loads(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))


@pytest.mark.slow  # a fresh interpreter imports torch and the model stack
def test_importing_model_utils_does_not_load_matplotlib():
    code = "import sys, model_utils; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("head", [0, 3])
def test_attention_single_head(explorer, head):
    response = explorer.attention(TEXT, 1, head)
    seq = len(response["tokens"])
    fig = plot_attention_heatmap(http_json(response))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]  # the others are colorbars
    (image,) = ax.images
    np.testing.assert_allclose(image.get_array(), response["attention_matrix"])
    assert image.get_array().shape == (seq, seq)
    assert [t.get_text() for t in ax.get_xticklabels()] == response["tokens"]
    assert ax.get_title() == f"layer 1, head {head}"


def test_attention_all_heads_one_panel_each(explorer, tiny_model):
    response = explorer.attention(TEXT, 2, None)
    n_heads = int(tiny_model.cfg.n_heads)
    fig = plot_attention_heatmap(response)
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("head")]
    assert len(panels) == n_heads
    for head, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), response["attention_matrix"][head])


def test_attention_array_input_needs_tokens(explorer):
    matrix = explorer.attention(TEXT, 0, 0)["attention_matrix"]
    with pytest.raises(ValueError, match="tokens"):
        plot_attention_heatmap(matrix)
    fig = plot_attention_heatmap(matrix, [f"t{i}" for i in range(len(matrix))], title="mine")
    assert fig.axes[0].get_title() == "mine"


def test_trajectories_from_trace_response(explorer, tiny_model):
    response = http_json(explorer.trace(TEXT, [1, 3, 5]))
    fig = plot_trajectories(response)
    ax = fig.axes[0]
    n_layers = int(tiny_model.cfg.n_layers)
    paths = [line for line in ax.lines if len(line.get_xdata()) > 1]
    assert len(paths) == 3  # one path per token, plus a start and an end marker each
    assert len(ax.lines) == 3 * 3
    for path, index in zip(paths, response["token_indices"]):
        points = response["trajectories"][str(index)]
        assert len(path.get_xdata()) == n_layers
        np.testing.assert_allclose(path.get_xdata(), [p["x"] for p in points])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [t["token_str"] for t in response["tokens"]]
    with pytest.raises(ValueError, match="UMAP"):
        plot_trajectories(response, method="umap")


def test_trajectories_from_arrays_pca(explorer, tiny_model):
    resid = explorer.run(TEXT).resid.numpy()  # [n_layers, seq, d_model]
    fig = plot_trajectories(resid, method="pca")
    paths = [line for line in fig.axes[0].lines if len(line.get_xdata()) > 1]
    assert len(paths) == resid.shape[1]
    assert all(len(p.get_xdata()) == resid.shape[0] for p in paths)
    xy = project_2d(resid.transpose(1, 0, 2))
    np.testing.assert_allclose(paths[2].get_ydata(), xy[2, :, 1])


@pytest.mark.slow  # UMAP's numba compilation
@pytest.mark.skipif(not HAVE_UMAP, reason="umap-learn is not installed")
def test_trajectories_umap(explorer):
    resid = explorer.run(TEXT).resid.numpy()
    fig = plot_trajectories(resid[:, 1:], method="umap")
    paths = [line for line in fig.axes[0].lines if len(line.get_xdata()) > 1]
    assert len(paths) == resid.shape[1] - 1
    assert fig.axes[0].get_xlabel() == "UMAP 1"


def test_project_2d_rejects_unknown_method():
    with pytest.raises(ValueError, match="pca, umap"):
        project_2d(np.zeros((4, 8)), method="tsne")


def test_logit_lens_one_cell_per_layer_and_rank(explorer, tiny_model):
    response = http_json(explorer.predict(TEXT, 4, 5))
    fig = plot_logit_lens(response)
    ax = fig.axes[0]
    n_layers = int(tiny_model.cfg.n_layers)
    (image,) = ax.images
    assert image.get_array().shape == (n_layers, 5)
    assert len(ax.texts) == n_layers * 5
    top = response["predictions_by_layer"][-1]["top_tokens"][0]
    assert ax.texts[(n_layers - 1) * 5].get_text() == top["token"]
    assert image.get_array()[n_layers - 1, 0] == pytest.approx(top["probability"])


def test_token_probabilities_from_predict(explorer, tiny_model):
    response = explorer.predict(TEXT, 4, 4)
    fig = plot_token_probabilities(response)
    ax = fig.axes[0]
    n_layers = int(tiny_model.cfg.n_layers)
    assert len(ax.lines) == 4  # the last layer's top-4 tokens
    last = response["predictions_by_layer"][-1]["top_tokens"]
    for line, token in zip(ax.lines, last):
        assert len(line.get_ydata()) == n_layers
        assert line.get_ydata()[-1] == pytest.approx(token["probability"])
        assert line.get_label() == token["token"]


def test_token_probabilities_from_array():
    probs = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    fig = plot_token_probabilities(probs, ["a$b", " c"])
    lines = fig.axes[0].lines
    assert len(lines) == 2
    np.testing.assert_allclose(lines[1].get_ydata(), probs[:, 1])
    assert lines[0].get_label() == r"a\$b"  # escaped: a lone `$` would start mathtext
    fig.savefig(io.BytesIO(), format="png")  # renders without a display or pyplot


# --- which heads matter ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_client(tiny_model):
    from app import create_app

    return create_app({"TESTING": True}, model=tiny_model).test_client()


def test_head_grid_of_an_ablation(api_client, tiny_model):
    from model_utils import plot_head_grid

    response = api_client.post("/ablate", json={"text": PAIR["clean"], "answer": " Mary"}).get_json()
    fig = plot_head_grid(response["effect"], title="ablation")
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(image.get_array(), response["effect"])
    assert image.get_array().shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    assert image.get_clim()[0] == -image.get_clim()[1]  # centred on 0
    assert ax.get_title() == "ablation" and not ax.texts


def test_head_grid_marks_the_taxonomy(tiny_model):
    from model_utils import plot_head_grid

    n_layers, n_heads = int(tiny_model.cfg.n_layers), int(tiny_model.cfg.n_heads)
    roles = ["facilitating", "interfering", "irrelevant", "ambiguous"]
    taxonomy = [[roles[(l + h) % 4] for h in range(n_heads)] for l in range(n_layers)]
    gates = np.linspace(0, 1, n_layers * n_heads).reshape(n_layers, n_heads)
    fig = plot_head_grid(gates, taxonomy=taxonomy, gates=True)
    ax = fig.axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    marks = {"facilitating": "F", "interfering": "I", "ambiguous": "?"}
    want = sorted((h, l, marks[r]) for l, row in enumerate(taxonomy) for h, r in enumerate(row) if r in marks)
    assert sorted((*t.get_position(), t.get_text()) for t in ax.texts) == want


def test_attribution_vs_patching_scatter(api_client, tiny_model):
    from model_utils import plot_attribution_vs_patching

    body = {**PAIR, "site": "heads"}
    with pytest.raises(ValueError, match="compare"):
        plot_attribution_vs_patching(api_client.post("/attribution_patch", json=body).get_json())
    response = api_client.post("/attribution_patch", json={**body, "compare": True}).get_json()
    fig = plot_attribution_vs_patching(response)
    ax = fig.axes[0]
    offsets = ax.collections[0].get_offsets()
    assert len(offsets) == tiny_model.cfg.n_layers * tiny_model.cfg.n_heads
    np.testing.assert_allclose(offsets[:, 0], np.ravel(response["exact_effect"]))
    np.testing.assert_allclose(offsets[:, 1], np.ravel(response["effect"]))
    assert ax.get_title().startswith(f"heads: Pearson r = {response['pearson']:.3f}")
def test_lens_grid_one_cell_per_layer_and_position(explorer, tiny_model):
    from model_utils import plot_lens_grid

    response = http_json(explorer.lens(TEXT, [1, 3, 5], None, 2))
    n_layers = int(tiny_model.cfg.n_layers)
    for shade, key in (("probability", None), ("entropy", "entropy"), ("kl", "kl_to_final")):
        fig = plot_lens_grid(response, shade)
        ax = fig.axes[0]
        (image,) = ax.images
        assert image.get_array().shape == (n_layers, 3)
        want = ([[c[0]["probability"] for c in row] for row in response["top"]] if key is None else response[key])
        np.testing.assert_allclose(image.get_array(), want)
        assert len(ax.texts) == n_layers * 3
        assert ax.texts[(n_layers - 1) * 3 + 2].get_text() == response["top"][-1][2][0]["token"].replace("$", r"\$")
    with pytest.raises(ValueError, match="shade"):
        plot_lens_grid(response, "rank")


def test_target_trajectory_marks_the_crossover(explorer, tiny_model):
    from model_utils import plot_target_trajectory

    final = explorer.lens(TEXT, [6], None, 1)["final"][0][0]["token_id"]
    response = http_json(explorer.lens(TEXT, [2, 6], final, 1))
    fig = plot_target_trajectory(response)  # the last position asked: 6
    ax, twin = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [row[1] for row in response["target"]["probability"]])
    np.testing.assert_allclose(twin.lines[0].get_ydata(), [row[1] for row in response["target"]["rank"]])
    assert twin.get_yscale() == "log"
    crossover = response["target"]["crossover_layer"][1]
    assert crossover is not None  # the model's own answer is top-1 at the last layer
    assert ax.lines[1].get_xdata()[0] == crossover and f"layer {crossover}" in ax.lines[1].get_label()
    with pytest.raises(ValueError, match="target"):
        plot_target_trajectory(http_json(explorer.lens(TEXT, [6], None, 1)))
    with pytest.raises(ValueError, match="position 4"):
        plot_target_trajectory(response, 4)


def test_dla_bars_and_head_heatmap(explorer, tiny_model):
    from model_utils import plot_dla

    response = http_json(explorer.dla(TEXT, " mat", " floor"))
    fig = plot_dla(response)
    bars, heat = fig.axes[0], fig.axes[1]
    n_layers, n_heads = int(tiny_model.cfg.n_layers), int(tiny_model.cfg.n_heads)
    heights = [patch.get_height() for patch in bars.patches]
    np.testing.assert_allclose(heights, response["attn"] + response["mlp"])
    np.testing.assert_allclose(heat.images[0].get_array(), response["heads"])
    assert heat.images[0].get_array().shape == (n_layers, n_heads)
    lo, hi = heat.images[0].get_clim()
    assert lo == -hi  # diverging around 0
    fig.savefig(io.BytesIO(), format="png")


def test_patching_position_grid(api_client, tiny_model):
    from model_utils import plot_patching

    response = api_client.post("/patch", json={**PAIR, "site": "resid_pre"}).get_json()
    fig = plot_patching(response)
    ax = fig.axes[0]
    (image,) = ax.images
    np.testing.assert_allclose(image.get_array(), response["recovery"])
    assert image.get_array().shape == (tiny_model.cfg.n_layers, len(response["tokens_clean"]))
    lo, hi = image.get_clim()
    assert lo == -hi and hi >= 1  # diverging around 0, full recovery inside the scale
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == response["tokens_clean"]
    differ = [i for i, (a, b) in enumerate(zip(response["tokens_clean"], response["tokens_corrupt"])) if a != b]
    assert [i for i, t in enumerate(labels) if t.get_color() == "tab:red"] == differ != []
    assert ax.get_title() == "resid_pre, denoise: logit(' Mary') - logit(' John')"
    fig.savefig(io.BytesIO(), format="png")


def test_patching_head_grids(api_client, tiny_model):
    from model_utils import plot_patching

    heads = api_client.post("/patch", json={**PAIR, "site": "heads", "direction": "noise"}).get_json()
    image = plot_patching(heads).axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), heads["recovery"])
    by_pos = api_client.post("/patch", json={**PAIR, "site": "heads_by_position"}).get_json()
    recovery = np.asarray(by_pos["recovery"])
    busiest = int(np.abs(recovery).sum(axis=(0, 1)).argmax())
    ax = plot_patching(by_pos).axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), recovery[:, :, busiest])
    assert f"at position {busiest}" in ax.get_title()
    np.testing.assert_allclose(plot_patching(by_pos, 2).axes[0].images[0].get_array(), recovery[:, :, 2])
    assert ax.images[0].get_array().shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    with pytest.raises(ValueError, match="position"):
        plot_patching(heads, 2)


def test_patching_without_recovery_draws_the_metric_change(api_client):
    from model_utils import plot_patching

    same = api_client.post("/patch", json={**PAIR, "corrupt": PAIR["clean"], "site": "mlp_out"}).get_json()
    assert same["recovery"] is None and same["warning"]
    fig = plot_patching(same)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.asarray(same["effect"]) - same["corrupt_metric"])
    assert fig.axes[1].get_ylabel() == "metric change"


def test_causal_trace_three_panels(api_client, tiny_model):
    from model_utils import plot_causal_trace

    body = {"text": FACT, "subject": "Eiffel Tower", "samples": 2}
    traces = [api_client.post("/causal_trace", json={**body, "kind": kind}).get_json() for kind in ("resid", "mlp", "attn")]
    fig = plot_causal_trace(traces)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for ax, trace, cmap in zip(panels, traces, ("Purples", "Greens", "Reds")):
        np.testing.assert_allclose(ax.images[0].get_array(), np.asarray(trace["scores"]).T)
        assert ax.images[0].get_cmap().name == cmap
        assert ax.get_title().startswith(f"restore {trace['kind']}")
    starred = [i for i, t in enumerate(panels[0].get_yticklabels()) if t.get_text().endswith("*")]
    assert starred == traces[0]["subject_positions"]
    one = plot_causal_trace(traces[0])  # one response: one panel
    assert len([ax for ax in one.axes if ax.images]) == 1
    fig.savefig(io.BytesIO(), format="png")
