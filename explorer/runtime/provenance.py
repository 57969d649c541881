"""Provenance: where an answer came from, built in this one place.

An answer's `provenance` says which model (name; source: a hub id with the resolved commit of the
files loaded, a local directory with a content hash of its files, or random weights with their
seed; family, dtype, device), which software (Python, torch, transformers, TransformerLens, this
project's version and git commit), and which request (the endpoint, the body as received, the
seeds used, the time of the answer). `GET /model` carries the static part (model and software).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__

ROOT = Path(__file__).resolve().parents[2]  # the checkout (or install) holding the explorer package
PACKAGES = {"torch": "torch", "transformers": "transformers", "transformer_lens": "transformer-lens"}
# What a save_pretrained directory's hash covers: weights, config and tokenizer (they all change answers).
HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".pt", ".pth")
CHUNK = 1 << 24
HASH_CACHE_ENTRIES = 256  # directories whose digest is remembered (HASH_CACHE: $XDG_CACHE_HOME/explorer/hashes.json)


def files_hash(directory: str) -> dict[str, Any]:
    """`{"sha256", "files"}`: one SHA-256 over the names and contents of a model directory's
    config, tokenizer and weight files (top level, sorted by name), so it changes when any of them
    does.

    Reading gigabytes of weights at every start costs seconds (2 s per 500 MB measured here), so
    the digest is kept in HASH_CACHE under the files' path, size and modification time, as git and
    make trust them: a start with unchanged files reads none of them."""
    names = sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.suffix in HASHED_SUFFIXES)
    stats = [(name, (st := os.stat(os.path.join(directory, name))).st_size, st.st_mtime_ns) for name in names]
    key = hashlib.sha256(json.dumps([os.path.abspath(directory), stats]).encode()).hexdigest()
    cache = _hash_cache()
    if key in cache:
        return {"sha256": cache[key], "files": names}
    total = hashlib.sha256()
    for name in names:
        total.update(name.encode() + b"\0")
        with open(os.path.join(directory, name), "rb") as f:
            while block := f.read(CHUNK):
                total.update(block)
        total.update(b"\0")
    _remember(cache, key, total.hexdigest())
    return {"sha256": total.hexdigest(), "files": names}


def _hash_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "explorer" / "hashes.json"


def _hash_cache() -> dict[str, str]:
    try:
        found = json.loads(_hash_file().read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(cache: dict[str, str], key: str, digest: str) -> None:
    """Add a digest to the cache file, keeping the newest HASH_CACHE_ENTRIES (a failed write only
    means hashing again next time)."""
    cache.pop(key, None)
    cache[key] = digest
    kept = dict(list(cache.items())[-HASH_CACHE_ENTRIES:])
    path = _hash_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, path)  # atomic: concurrent starts never read a half-written file
    except OSError:
        pass


def hub_source(name: str, revision: str | None) -> dict[str, Any]:
    """A hub model's source: its id and the commit its files were resolved to. transformers loads
    through the Hugging Face cache (online too), whose snapshot folders are named by commit: the
    folder holding the config the branch (or `revision`) points to is the one loaded."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    commit = Path(found).parent.name if isinstance(found, str) else None
    return {"kind": "hub", "id": name, "revision": commit, "requested_revision": revision}


@functools.cache
def project_version() -> dict[str, Any]:
    """This project's version, and its git commit (and whether tracked files differ from it) when
    run from a checkout; commit None otherwise."""
    out: dict[str, Any] = {"version": __version__, "commit": None, "modified": None}
    if not (ROOT / ".git").exists():
        return out
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        out["commit"] = git("rev-parse", "HEAD")
        out["modified"] = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git binary, or not a repository after all
        pass
    return out


@functools.cache
def software() -> dict[str, Any]:
    """The versions that decide an answer's numbers."""
    out: dict[str, Any] = {"python": platform.python_version()}
    for key, package in PACKAGES.items():
        try:
            out[key] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    out["explorer"] = project_version()
    return out


def static(model: dict[str, Any]) -> dict[str, Any]:
    """The part that is the same for every answer of one model: `model` (its `LoadedModel.describe()`)
    and the software."""
    return {"model": model, "software": software()}


def now() -> str:
    """The current time, UTC, ISO 8601 to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(model: dict[str, Any], endpoint: str, request: Any, seeds: dict[str, int]) -> dict[str, Any]:
    """The provenance of one answer: the static part, then the endpoint, the request as received,
    the seeds used (defaults included) and the time of the answer."""
    return {**static(model), "endpoint": endpoint, "request": request, "seeds": seeds, "time": now()}
