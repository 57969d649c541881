"""Loading sparse autoencoders (SAEs) from their files: the SAELens directory format and Gemma
Scope's `params.npz`, from a local path or the Hugging Face hub (`repo_id:path/inside/repo`).

Why not the `sae-lens` library: its 6.x releases pin `transformer-lens<4` and import
`HookedTransformer`, which TransformerLens 4 no longer ships, so it cannot be installed beside
this project. The files are simple (a JSON config and a handful of tensors), so they are read
here directly, and the architectures' encoders are written out in `math/sae.py`. When SAELens
supports TransformerLens 4, `SAE.load_from_disk` / `SAE.from_pretrained` could replace
`load_sae`'s file reading (and its release registry would add names such as `gpt2-small-res-jb`);
the encoders would stay ours, since they run on the session's cached activations.
"""
from __future__ import annotations

import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import provenance
from .loading import ModelLoadError, hub_offline, hub_unreachable, needs_token

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
# The tensors each architecture needs (SAELens names; Gemma Scope's params.npz uses the JumpReLU ones).
PARAMETERS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}
SAELENS_CONFIG, SAELENS_WEIGHTS, GEMMA_SCOPE = "cfg.json", "sae_weights.safetensors", "params.npz"
HOOK = re.compile(r"^blocks\.(\d+)\.[\w.]+$")
OPTIONS = ("name", "model", "hook")
# Gemma Scope repositories say what they read in their name (google/gemma-scope-2b-pt-res, -mlp, -att).
GEMMA_SCOPE_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}


@dataclass
class SAE:
    """One SAE's parameters (float32, on the device it was moved to) and what it reads.

    W_enc [d_in, d_sae], W_dec [d_sae, d_in], biases and thresholds [d_sae], b_dec [d_in]. `hook`
    is a HookedTransformer-style hook name (`blocks.8.hook_resid_pre`), which the bridge uses too;
    `head` a single head of `attn.hook_z` (SAELens's `hook_head_index`)."""

    name: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    params: dict[str, torch.Tensor] = field(repr=False)
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int | None = None
    head: int | None = None
    model: str | None = None  # the model it was given for (`model=`), None: the default one
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> int:
        return int(HOOK.match(self.hook).group(1))  # type: ignore[union-attr]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "hook": self.hook, "layer": self.layer, "head": self.head,
                "d_in": self.d_in, "d_sae": self.d_sae, "architecture": self.architecture, "k": self.k,
                "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "normalize_activations": self.normalize_activations, "source": self.source}


@dataclass(frozen=True)
class Spec:
    """A parsed `--sae` value: `[name=N,][model=M,][hook=H,]LOCATION`."""

    location: str
    name: str | None = None
    model: str | None = None
    hook: str | None = None


def parse_spec(spec: str) -> Spec:
    """`name=res8,model=gpt2,jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre` -> `Spec`:
    leading `key=value,` options (name, model, hook), then the location."""
    options: dict[str, str] = {}
    rest = spec.strip()
    while True:
        key, sep, tail = rest.partition("=")
        if not sep or key not in OPTIONS or "," not in tail:
            break
        value, _, rest = tail.partition(",")
        if key in options or not value:
            raise ModelLoadError(f"--sae {spec!r}: {key}= is given twice or empty")
        options[key] = value
    if not rest:
        raise ModelLoadError(f"--sae {spec!r} names no SAE: give a directory, a params.npz file or "
                             "repo_id:path/inside/repo, optionally after name=..., model=..., hook=...")
    return Spec(rest, **options)


def for_model(specs: list[str], name: str, default: bool) -> list[str]:
    """The `--sae` values served on model `name`: those naming it (`model=`), and those naming no
    model when it is the `default` (first) one."""
    return [s for s in specs if parse_spec(s).model == name or (default and parse_spec(s).model is None)]


def _config_error(where: str, message: str) -> ModelLoadError:
    return ModelLoadError(f"Could not load the SAE {where}: {message}")


def read_files(path: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """(config, tensors, format) of the SAE at `path`: a SAELens directory (cfg.json +
    sae_weights.safetensors), or Gemma Scope's params.npz (the file, or a directory holding it)."""
    if path.is_dir() and (path / GEMMA_SCOPE).is_file() and not (path / SAELENS_CONFIG).is_file():
        path = path / GEMMA_SCOPE
    if path.is_file() and path.suffix == ".npz":
        import numpy as np

        with np.load(path) as npz:
            tensors = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
        d_in, d_sae = tensors["W_enc"].shape if "W_enc" in tensors else (0, 0)
        config = {"architecture": "jumprelu", "d_in": int(d_in), "d_sae": int(d_sae),
                  "apply_b_dec_to_input": False, "normalize_activations": "none"}
        return config, tensors, "gemma-scope"
    directory = path if path.is_dir() else path.parent
    if not (directory / SAELENS_CONFIG).is_file() or not (directory / SAELENS_WEIGHTS).is_file():
        raise _config_error(where, f"{path} holds neither {SAELENS_CONFIG} with {SAELENS_WEIGHTS} (the SAELens "
                                   f"format) nor {GEMMA_SCOPE} (Gemma Scope)")
    from safetensors.torch import load_file

    try:
        config = json.loads((directory / SAELENS_CONFIG).read_text())
    except ValueError as exc:
        raise _config_error(where, f"{SAELENS_CONFIG} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _config_error(where, f"{SAELENS_CONFIG} must hold a JSON object")
    return config, load_file(str(directory / SAELENS_WEIGHTS)), "saelens"


def build(config: dict[str, Any], tensors: dict[str, torch.Tensor], spec: Spec, where: str,
          source: dict[str, Any]) -> SAE:
    """Check a config and its tensors and make the `SAE` (400-style messages naming the config field)."""
    metadata = config.get("metadata") or {}
    hook = spec.hook or config.get("hook_name") or metadata.get("hook_name")
    if not isinstance(hook, str) or not HOOK.match(hook):
        raise _config_error(where, f"hook_name must be a hook such as blocks.8.hook_resid_pre, got {hook!r} "
                                   "(give hook=... before the location when the files do not say it)")
    arch = config.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise _config_error(where, f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    norm = config.get("normalize_activations") or "none"
    if norm not in NORMALIZATIONS:
        why = (" (it needs a scaling factor measured on a data set, which the files do not hold; fold it into "
               "the weights first)" if norm == "expected_average_only_in" else "")
        raise _config_error(where, f"normalize_activations {norm!r} is not supported{why}; supported: "
                                   f"{', '.join(NORMALIZATIONS)}")
    head = config.get("hook_head_index", metadata.get("hook_head_index"))
    if head is not None and (not isinstance(head, int) or not hook.endswith("attn.hook_z")):
        raise _config_error(where, f"hook_head_index must be an integer and applies to attn.hook_z only, got {head!r}")
    missing = [n for n in PARAMETERS[arch] if n not in tensors]
    if missing:
        raise _config_error(where, f"the {arch} architecture needs the tensors {', '.join(missing)}, missing from "
                                   "the weights")
    params = {n: tensors[n].detach().to(torch.float32).contiguous() for n in PARAMETERS[arch]}
    d_in, d_sae = (int(n) for n in params["W_enc"].shape)
    for name, want in (("d_in", d_in), ("d_sae", d_sae)):
        if config.get(name) not in (None, want):
            raise _config_error(where, f"{name} is {config[name]} in the config but {want} in W_enc")
    shapes = {"W_dec": (d_sae, d_in), "b_dec": (d_in,)} | {n: (d_sae,) for n in params if n[0] in "bt" and n != "b_dec"}
    shapes |= {"r_mag": (d_sae,)} if arch == "gated" else {}
    bad = [f"{n} {tuple(params[n].shape)} (want {s})" for n, s in shapes.items() if tuple(params[n].shape) != s]
    if bad:
        raise _config_error(where, "tensor shapes do not fit W_enc [d_in, d_sae]: " + ", ".join(bad))
    k = config.get("k")
    if arch == "topk" and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae):
        raise _config_error(where, f"k (the topk architecture's active features) must be an integer in 1 .. {d_sae}, "
                                   f"got {k!r}")
    apply_b_dec = config.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise _config_error(where, f"apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    name = spec.name or hook
    return SAE(name=name, hook=hook, architecture=arch, d_in=d_in, d_sae=d_sae, params=params,
               apply_b_dec_to_input=apply_b_dec, normalize_activations=norm, k=k if arch == "topk" else None,
               head=head, model=spec.model, source=source)


def _hub_download(repo: str, inside: str, where: str, revision: str | None) -> tuple[Path, str]:
    """The hub folder (or file) `inside` of `repo` (at `revision`, default its main branch),
    downloaded into the Hugging Face cache (or found there: offline then, like models), and the
    commit of the snapshot it is in."""
    from huggingface_hub import snapshot_download

    patterns = [inside, f"{inside.rstrip('/')}/*"]
    try:
        with hub_offline():
            local = snapshot_download(repo, allow_patterns=patterns, revision=revision)
    except Exception:  # not cached: download it
        from huggingface_hub import constants

        unreachable = None if constants.HF_HUB_OFFLINE else hub_unreachable()
        cause = unreachable or ("the hub is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else None)
        if cause:
            raise _config_error(where, f"it is not in the local Hugging Face cache, and {cause}. Download it where "
                                       "there is a network (huggingface-cli download REPO --include 'PATH/*'), or "
                                       "give a local directory") from None
        try:
            local = snapshot_download(repo, allow_patterns=patterns, revision=revision)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (" It is gated or private: accept its license on the hub and log in (huggingface-cli login) or "
                    "export HF_TOKEN." if needs_token(exc) else "")
            raise _config_error(where, f"the hub refused it ({type(exc).__name__}: {first}).{hint}") from exc
    found = Path(local) / inside
    if not found.exists():
        raise _config_error(where, f"the repository {repo} has no {inside!r}")
    return found, Path(local).name  # the cache's snapshot folders are named by commit


def load_sae(spec: str | Spec, device: str = "cpu", revision: str | None = None) -> SAE:
    """Load one `--sae` value (a hub reference at `revision`, default its main branch). Raises
    `ModelLoadError` with a message a user can act on."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    location = os.path.expanduser(spec.location)
    where = repr(spec.location)
    if os.path.exists(location):
        path = Path(location).resolve()
        hashed = path if path.is_dir() else path.parent
        source: dict[str, Any] = {"kind": "local", "path": str(path), **provenance.files_hash(str(hashed))}
    elif ":" in spec.location and "/" in spec.location.partition(":")[0] and not location.startswith((".", "/")):
        repo, _, inside = spec.location.partition(":")
        path, commit = _hub_download(repo, inside.strip("/"), where, revision)
        source = {"kind": "hub", "id": repo, "path": inside.strip("/"), "revision": commit}
    else:
        raise _config_error(where, "it is neither an existing file or directory nor a Hugging Face reference "
                                   "repo_id:path/inside/repo (e.g. jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre)")
    config, tensors, fmt = read_files(path, where)
    if fmt == "gemma-scope" and not spec.hook:
        config["hook_name"] = gemma_scope_hook(spec.location)
    sae = build(config, tensors, spec, where, {**source, "format": fmt})
    sae.params = {n: t.to(device) for n, t in sae.params.items()}
    return sae


def gemma_scope_hook(location: str) -> str | None:
    """The hook of a Gemma Scope SAE from where it lives (`google/gemma-scope-2b-pt-res:layer_20/...`:
    blocks.20.hook_resid_post), or None when its path does not say."""
    layer = re.search(r"layer_(\d+)", location)
    site = re.search(r"gemma-scope[^:/]*-(res|mlp|att)\b", location)
    if not layer or not site:
        return None
    return f"blocks.{layer.group(1)}.{GEMMA_SCOPE_SITES[site.group(1)]}"


def write_random_sae(directory: str | os.PathLike, *, d_in: int, d_sae: int, hook: str,
                     architecture: str = "standard", k: int | None = None, seed: int = 0,
                     apply_b_dec_to_input: bool = True, normalize_activations: str = "none",
                     fmt: str = "saelens", head: int | None = None, scale: float = 1.0,
                     active: float = 0.25) -> Path:
    """Write a seeded random SAE in the SAELens format (cfg.json + sae_weights.safetensors) or as
    Gemma Scope's params.npz (JumpReLU; `hook` is then not in the files: give hook= when loading),
    for tests, notebooks and demos without a download. Returns the path to load (`--sae PATH`).
    `scale` is the typical norm of the hook's activation: biases are drawn relative to it so that
    about an `active` fraction of the features fire on a token (a trained SAE's is ~0.01; tiny
    test SAEs want more)."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=gen)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    unit = scale / d_in ** 0.5  # the spread of one encoder row's reading of an activation
    tensors = {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec * scale ** 0.5,
               "b_dec": 0.1 * unit * torch.randn(d_in, generator=gen)}
    offset = statistics.NormalDist().inv_cdf(1 - active)  # a row's reading is about N(0, unit)
    biases = -unit * (offset - 0.5 + torch.rand(d_sae, generator=gen))
    if architecture == "gated":
        tensors |= {"b_gate": biases, "b_mag": 0.1 * unit * torch.randn(d_sae, generator=gen),
                    "r_mag": 0.1 * torch.randn(d_sae, generator=gen)}
    else:
        tensors["b_enc"] = biases
    if architecture == "jumprelu" or fmt == "gemma-scope":
        tensors["threshold"] = 0.5 * unit * torch.rand(d_sae, generator=gen)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "gemma-scope":
        import numpy as np

        np.savez(path / GEMMA_SCOPE, **{n: t.numpy() for n, t in tensors.items()})
        return path / GEMMA_SCOPE
    from safetensors.torch import save_file

    save_file(tensors, str(path / SAELENS_WEIGHTS))
    config = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
              "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize_activations,
              "metadata": {"hook_name": hook, **({"hook_head_index": head} if head is not None else {})}}
    if k is not None:
        config["k"] = k
    (path / SAELENS_CONFIG).write_text(json.dumps(config))
    return path


def source_spec(name: str, model: str | None, hook: str, source: dict[str, Any]) -> tuple[Spec, str | None]:
    """The `Spec` (and hub revision) that loads again the SAE a provenance's `source` describes."""
    if source.get("kind") == "hub":
        return Spec(f"{source['id']}:{source['path']}", name, model, hook), source.get("revision")
    if source.get("kind") == "local":
        return Spec(source["path"], name, model, hook), None
    raise ModelLoadError(f"the result does not say where SAE {name!r} came from (source {source!r})")
