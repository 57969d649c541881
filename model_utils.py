"""Public facade of the explorer's core: load a model, tokenize, trace, attention, predict.

    from model_utils import load_model, Explorer
    ex = Explorer(load_model("gpt2"))
    ex.predict("The cat sat on the mat", token_index=5, top_k=5)
"""
from explorer.analysis import (
    InvalidRequest,
    LENS_TOP_K_MAX,
    attention,
    forward,
    lens_top_k,
    pca_2d,
    predictions,
    trace,
    trace_pca,
)
from explorer.engine import ByteLRU, ModelWorker, Overloaded, Run, tune_allocator
from explorer.loading import LoadedModel, ModelLoadError, gpt2_tokenizer, load_model, random_gpt2
from explorer.service import Explorer

__all__ = [
    "ByteLRU", "Explorer", "InvalidRequest", "LENS_TOP_K_MAX", "LoadedModel", "ModelLoadError",
    "ModelWorker", "Overloaded", "Run", "attention", "forward", "gpt2_tokenizer", "lens_top_k",
    "load_model", "pca_2d", "predictions", "random_gpt2", "trace", "trace_pca", "tune_allocator",
]

# Causal interventions: shared targets and recovery, cached activations, batched patching and tracing.
from explorer.jobs import JobManager  # noqa: E402
from explorer.patching import patch  # noqa: E402
from explorer.replay import Acts, capture, run_rows  # noqa: E402
from explorer.targets import Target, parse_target, recovery  # noqa: E402
from explorer.tracing import causal_trace  # noqa: E402

__all__ += ["Acts", "JobManager", "Target", "capture", "causal_trace", "parse_target", "patch", "recovery", "run_rows"]

# Which heads matter: ablation sweeps, attribution patching, causal head gating (jobs' steps).
from explorer.chg import chg  # noqa: E402
from explorer.heads import ablate, attribution_patch  # noqa: E402

__all__ += ["ablate", "attribution_patch", "chg"]

# Plotting (matplotlib is imported only when a plot function is called, never by the server).
from explorer.plots import (  # noqa: E402
    plot_attention_heatmap,
    plot_attribution_vs_patching,
    plot_head_grid,
    plot_logit_lens,
    plot_token_probabilities,
    plot_trajectories,
    project_2d,
)

__all__ += ["plot_attention_heatmap", "plot_attribution_vs_patching", "plot_head_grid", "plot_logit_lens",
            "plot_token_probabilities", "plot_trajectories", "project_2d"]

# Reading the prediction (Explorer.lens, .score, .dla): the grid, a target's trajectory, DLA.
from explorer.plots import plot_dla, plot_lens_grid, plot_target_trajectory  # noqa: E402

__all__ += ["plot_dla", "plot_lens_grid", "plot_target_trajectory"]

# Causal interventions: the /patch heatmap and ROME's causal-tracing panels.
from explorer.plots import plot_causal_trace, plot_patching  # noqa: E402

__all__ += ["plot_causal_trace", "plot_patching"]
