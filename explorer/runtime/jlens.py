"""Jacobian lenses (TransformerLens' `JacobianLens`): loading one for a model (a local file or
directory, a registry short name or Hugging Face id through the library's resolution, or `auto`),
checking that the model can use one, and saving a fitted one where `--jlens` finds it again.

A lens maps each layer's residual stream (the output of block l) through a fitted d_model x
d_model matrix J[l] into the final block's output basis before the final norm and unembedding;
J = I is the logit lens. The library refuses a model whose residual basis is not the raw Hugging
Face one (compatibility mode, processed weights) and non-causal or non-standard output paths;
`unusable` turns that refusal into a reason a request can be answered with.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .loading import LoadedModel, ModelLoadError, hub_offline, hub_unreachable

log = logging.getLogger("explorer")

DEFAULT_DIR = os.path.join("~", ".cache", "explorer", "jlens")  # where fitted lenses are saved (--jlens-dir)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a lens's name: also its file name
SUFFIX = ".pt"


@dataclass
class LoadedLens:
    """A lens ready for one model: the library's object (its matrices in float32, and a copy on
    each other device it is used on) and where it came from."""

    name: str
    lens: Any  # transformer_lens.tools.analysis.JacobianLens
    source: dict[str, Any]  # {"kind": "file", "path", "sha256"} | {"kind": "hub", "repo", "filename", "revision"}

    def covers(self, n_layers: int) -> bool:
        """Whether every layer below the last has a transport (the grid reads them all)."""
        return self.lens.source_layers == list(range(n_layers - 1))

    def info(self) -> dict[str, Any]:
        """What `GET /model` and an answer's `artifact` say about the lens: its provenance."""
        meta = self.lens.metadata
        return {"name": self.name, "source": self.source, "corpus": meta.get("corpus"),
                "n_prompts": self.lens.n_prompts, "source_layers": self.lens.source_layers,
                "model_name": meta.get("model_name"), "model_revision": meta.get("model_revision"),
                "transformer_lens_version": meta.get("transformer_lens_version"),
                "max_seq_len": meta.get("max_seq_len"), "fit_dtype": meta.get("fit_dtype")}


def unusable(bridge: Any) -> str | None:
    """Why `bridge` cannot use a Jacobian lens (the library's own check, through a probe lens whose
    matrix is a broadcast zero: no d_model^2 memory), or None when it can."""
    from transformer_lens.tools.analysis import JacobianLens

    n_layers, d_model = int(bridge.cfg.n_layers), int(bridge.cfg.d_model)
    if n_layers < 2:
        return "a Jacobian lens transports layers below the last one, and this model has a single layer"
    probe = JacobianLens({0: torch.zeros(()).expand(d_model, d_model)}, n_prompts=0, d_model=d_model)
    try:
        probe.validate_model(bridge)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def lens_error(spec: str, model: str, cause: str) -> ModelLoadError:
    """The one paragraph a user reads when a `--jlens` spec cannot be loaded."""
    return ModelLoadError(
        f"Could not load the Jacobian lens {spec!r} for the model {model!r} ({cause}). "
        "--jlens takes a lens file (.pt) or a directory holding lens.pt, a registry short name or "
        "Hugging Face model id with a published lens (e.g. gpt2-small, google/gemma-2-2b), or auto "
        "(the registry's lens for the loaded model, if it has one); prefix MODEL= to give it to a "
        "model other than the first. Offline, a hub lens must already be in the Hugging Face cache; "
        "a lens fitted with POST /jobs/jlens_fit is saved under --jlens-dir and loads by its path.")


def _registry(name: str) -> tuple[str, str, str] | None:
    """(repo, filename, pinned revision) of the library's registry entry for a short name or HF id."""
    from transformer_lens.tools.analysis.jacobian_lens import _registry_revision, _resolve_registry_entry

    found = _resolve_registry_entry(name)
    return None if found is None else (*found, _registry_revision())


def file_sha256(path: str) -> str:
    total = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            total.update(block)
    return total.hexdigest()


def load(spec: str, model: LoadedModel, name: str | None = None) -> LoadedLens | None:
    """The lens `spec` names, checked against `model` (None: `auto` and the registry has no lens
    for the model). Raises `ModelLoadError` with the one paragraph to show."""
    from transformer_lens.tools.analysis import JacobianLens

    why = unusable(model.bridge)
    if why is not None:
        raise lens_error(spec, model.name, f"the model cannot use a Jacobian lens: {why}")
    local = os.path.expanduser(spec)
    if spec == "auto":
        hub_id = (model.source or {}).get("id") if (model.source or {}).get("kind") == "hub" else None
        entry = None if hub_id is None else _registry(hub_id)
        if entry is None:
            log.info("--jlens auto: the lens registry has no lens for %s", model.name)
            return None
    elif os.path.exists(local):
        path = os.path.join(local, "lens.pt") if os.path.isdir(local) else local
        if not os.path.isfile(path):
            raise lens_error(spec, model.name, f"{path} does not exist")
        entry = None
    elif spec.startswith((".", "/", "~")):
        raise lens_error(spec, model.name, "no such file or directory")
    else:
        entry = _registry(spec)
        if entry is None:
            raise lens_error(spec, model.name, "the library's lens registry has no entry of that name")
    try:
        if entry is None:
            lens = JacobianLens.load(path)
            source: dict[str, Any] = {"kind": "file", "path": os.path.abspath(path), "sha256": file_sha256(path)}
        else:
            repo, filename, revision = entry
            lens = JacobianLens.load(_hub_file(spec, model.name, repo, filename, revision))
            source = {"kind": "hub", "repo": repo, "filename": filename, "revision": revision}
        lens.validate_model(model.bridge)
    except ModelLoadError:
        raise
    except Exception as exc:  # a broken file, a lens of another model, the hub
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise lens_error(spec, model.name, f"{type(exc).__name__}: {first}") from exc
    default = os.path.splitext(os.path.basename(source.get("path") or source.get("filename")))[0]
    return LoadedLens(name or default, lens, source)


def available(model: LoadedModel, directory: str) -> list[dict[str, Any]]:
    """The lenses `model` can use, loaded or not, each with the `--jlens` spec that loads it: the
    library registry's lens for the model's hub id (`cached`: in the Hugging Face cache, so it
    loads offline), and the lenses saved under `directory` (fits) for a model of its name and
    width, which a request can also name as `jlens` (`saved` loads them on first use)."""
    loaded = [lens.source for lens in list(model.lenses.values())]
    found: list[dict[str, Any]] = []
    source = model.source or {}
    entry = _registry(source["id"]) if source.get("kind") == "hub" else None
    if entry is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, filename, revision = entry
        cached = try_to_load_from_cache(repo, filename, revision=revision)
        found.append({"kind": "hub", "spec": source["id"], "name": os.path.splitext(os.path.basename(filename))[0],
                      "repo": repo, "filename": filename, "revision": revision,
                      "cached": isinstance(cached, str) and os.path.exists(cached),
                      "loaded": any(s.get("repo") == repo and s.get("filename") == filename for s in loaded)})
    directory = os.path.expanduser(directory)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for file in names:
        path = os.path.abspath(os.path.join(directory, file))
        meta = _saved_for(model, path) if file.endswith(SUFFIX) else None
        if meta is None:
            continue
        found.append({"kind": "file", "spec": path, "name": file[:-len(SUFFIX)], "corpus": meta["corpus"],
                      "n_prompts": meta["n_prompts"], "cached": True,
                      "loaded": any(s.get("path") == path for s in loaded)})
    return found


_metadata: dict[tuple[str, int, int], dict[str, Any] | None] = {}  # (path, mtime, size) -> what `available` reads


def _saved_for(model: LoadedModel, path: str) -> dict[str, Any] | None:
    """The metadata of the lens saved at `path` when it was fitted for a model of `model`'s name and
    width; None otherwise (another model's lens, not a lens, no file)."""
    meta = _saved_metadata(path)
    if meta is None or meta["model_name"] != model.cfg.model_name or meta["d_model"] != int(model.cfg.d_model):
        return None
    return meta


def _saved_metadata(path: str) -> dict[str, Any] | None:
    """A saved lens's model name, width, corpus and prompt count, read without its matrices (the
    file is memory-mapped, not read); None for a file that is not a lens artifact."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _metadata:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            meta = payload.get("metadata") or {}
            _metadata[key] = {"model_name": meta.get("model_name"), "d_model": int(payload["d_model"]),
                              "corpus": meta.get("corpus"), "n_prompts": int(payload.get("n_prompts", 0))}
        except Exception:  # not a lens (another .pt file in the directory)
            _metadata[key] = None
    return _metadata[key]


def saved(model: LoadedModel, directory: str, name: str) -> LoadedLens | None:
    """The lens saved as `directory/NAME.pt` for `model`, loaded and registered on the model (it
    stays loaded), or None when no such lens was saved for it."""
    if not NAME.match(name):
        return None
    path = os.path.abspath(os.path.join(os.path.expanduser(directory), name + SUFFIX))
    if _saved_for(model, path) is None:
        return None
    lens = load(path, model, name)
    return None if lens is None else model.lenses.setdefault(name, lens)


def _hub_file(spec: str, model: str, repo: str, filename: str, revision: str) -> str:
    """The local path of a hub lens file, from the cache without the network when it is there
    (as models load), else downloaded; an unreachable hub fails fast with the paragraph."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename, revision=revision)
    offline: Any = contextlib.nullcontext()
    if isinstance(cached, str) and os.path.exists(cached):
        offline = hub_offline()
    elif constants.HF_HUB_OFFLINE:
        raise lens_error(spec, model, "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    else:
        unreachable = hub_unreachable()
        if unreachable:
            raise lens_error(spec, model, f"it is not in the local Hugging Face cache, and {unreachable}")
    with offline:
        return hf_hub_download(repo_id=repo, filename=filename, revision=revision)


DIM_BATCH = 8  # output dimensions per backward pass (the library's default; recorded in the artifact)


def backward_passes(d_model: int) -> int:
    """Backward passes a fit takes per text: one per DIM_BATCH output dimensions."""
    return -(-d_model // DIM_BATCH)


def fit(bridge: Any, texts: list[str], *, corpus: str, source_layers: list[int] | None, max_seq_len: int,
        pause: Callable[[], None]) -> Any:
    """`JacobianLens.fit(bridge, texts, ...)` exactly (the same validation, drive loop, sums and
    metadata), calling `pause()` before each of its backward passes. The library's fit is one call
    of minutes on a CPU; `_fit_transport_matrices` is its drive loop, and its `backward_provider`
    (the library's seam for the backward step, here its own `_ordinary_vjp`) is the one place a
    fit can stop: one forward pass per text, then `backward_passes(d_model)` backward passes."""
    from transformer_lens.tools.analysis import JacobianLens
    from transformer_lens.tools.analysis.jacobian_lens import (
        DEFAULT_SKIP_FIRST_POSITIONS, ESTIMATOR_JACOBIAN, _build_fit_metadata, _fit_transport_matrices,
        _ordinary_vjp, _prepare_fit)

    def backward(*args: Any) -> tuple[torch.Tensor, ...]:
        pause()
        return _ordinary_vjp(*args)

    options = _prepare_fit(bridge, operation=JacobianLens.__name__, estimator=ESTIMATOR_JACOBIAN, corpus=corpus,
                           source_layers=source_layers, dim_batch=DIM_BATCH, max_seq_len=max_seq_len,
                           skip_first_positions=DEFAULT_SKIP_FIRST_POSITIONS, metadata=None)
    matrices, n_done = _fit_transport_matrices(
        bridge, texts, source_layers=list(options.source_layers), dim_batch=options.dim_batch,
        max_seq_len=options.max_seq_len, skip_first_positions=options.skip_first_positions,
        show_progress=False, backward_provider=backward)
    return JacobianLens(matrices, n_prompts=n_done, d_model=options.d_model, metadata=_build_fit_metadata(
        bridge, options, estimator=ESTIMATOR_JACOBIAN, n_prompts=n_done, metadata=None))


def split_spec(spec: str, names: list[str]) -> tuple[str, str]:
    """`--jlens [MODEL=]SPEC` -> (model name, spec); without a loaded model's name before `=`,
    the first model's."""
    model, sep, rest = spec.partition("=")
    if sep and model in names:
        return model, rest
    return names[0], spec


def attach(models: list[LoadedModel], specs: list[str]) -> None:
    """Load every `--jlens` spec onto its model (`LoadedModel.lenses`, by name)."""
    by_name = {m.name: m for m in models}
    for spec in specs:
        model_name, lens_spec = split_spec(spec, list(by_name))
        model = by_name[model_name]
        loaded = load(lens_spec, model)
        if loaded is None:
            continue
        if loaded.name in model.lenses:
            raise lens_error(spec, model_name, f"a lens named {loaded.name!r} is already loaded for it")
        model.lenses[loaded.name] = loaded
        log.info("Jacobian lens %s loaded for %s (%d prompts, layers %s)", loaded.name, model.name,
                 loaded.lens.n_prompts, loaded.lens.source_layers)


def save(lens: Any, directory: str, name: str) -> str:
    """Write `lens` as `directory/name.pt` (the library's artifact format, float16); never over an
    existing file (FileExistsError). Returns the path."""
    directory = os.path.expanduser(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + SUFFIX)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
    os.close(fd)
    try:
        lens.save(tmp)
        os.link(tmp, path)  # atomic, and fails when the name is taken (two fits of one name at once)
    finally:
        os.unlink(tmp)
    return os.path.abspath(path)
