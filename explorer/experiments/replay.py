"""`python -m explorer replay result.json [--against URL]`: re-run every request of a result (an
experiment's result.json or a viewer's JSON export) in-process or against a running server, and
say per request whether the answer matches within the documented precision:

- numbers: within 1e-5 relative, relative to the largest magnitude in the same field (an array's
  cells are compared at its own scale, so a near-zero cell rounded to fixed decimals does not
  count as a large relative change); attention weights (`attention_matrix`, stored as float16)
  within 1e-3 relative; integers exactly;
- strings, booleans, nulls, keys and lengths exactly.

The largest difference and where it is are reported; a provenance that differs (another model
revision or weights hash, other library versions, device or dtype) is a warning. Exit status 1 when
any request does not match.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.loading import LoadedModel, ModelLoadError, load_model
from ..runtime.saes import SAE, load_sae, source_spec
from ..web.server import create_app
from .client import Client, InProcess, Outcome, Remote, execute

RELATIVE = 1e-5
ATTENTION_RELATIVE = 1e-3  # float16 holds ~3.3 significant digits
FLOAT16_FIELDS = ("attention_matrix",)
# The provenance fields whose change is worth a warning (what decides the numbers).
WATCHED = ("model", "software")
UNWATCHED = {"name", "path", "files", "requested_revision", "modified"}  # labels, not causes


@dataclass
class Difference:
    """The largest numeric difference found (relative to its field's scale), and every exact mismatch."""

    largest: float = 0.0  # absolute
    relative: float = 0.0
    where: str = ""
    mismatches: list[str] = field(default_factory=list)


def _scale(value: Any) -> float:
    """The largest magnitude among the numbers in `value` (0 for none)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return 0.0
    if isinstance(value, (int, float)):
        return abs(float(value))
    if isinstance(value, list):
        return max((_scale(v) for v in value), default=0.0)
    return 0.0  # a dict starts fields of its own


def compare(expected: Any, actual: Any, path: str = "", tolerance: float = RELATIVE, scale: float | None = None,
            diff: Difference | None = None) -> Difference:
    """Walk two JSON values; numbers within `tolerance` of their field's scale, the rest exact."""
    diff = diff or Difference()
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(expected.keys() | actual.keys()):
            where = f"{path}.{key}" if path else key
            if key not in actual or key not in expected:
                diff.mismatches.append(f"{where}: {'missing' if key not in actual else 'unexpected'}")
                continue
            rtol = ATTENTION_RELATIVE if key in FLOAT16_FIELDS else tolerance
            compare(expected[key], actual[key], where, rtol, None, diff)
        return diff
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            diff.mismatches.append(f"{path}: length {len(expected)} != {len(actual)}")
            return diff
        scale = max(_scale(expected), _scale(actual)) if scale is None else scale
        for i, (e, a) in enumerate(zip(expected, actual)):
            compare(e, a, f"{path}[{i}]", tolerance, scale, diff)
        return diff
    numbers = (int, float)
    if isinstance(expected, numbers) and isinstance(actual, numbers) \
            and not isinstance(expected, bool) and not isinstance(actual, bool):
        gap = abs(float(expected) - float(actual))
        size = max(abs(float(expected)), abs(float(actual))) if scale is None else scale
        relative = gap / size if size else (0.0 if gap == 0 else float("inf"))
        exact = isinstance(expected, int) and isinstance(actual, int)
        if not exact and gap > diff.largest:  # integers (ids, ranks, positions) are a mismatch or nothing
            diff.largest, diff.relative, diff.where = gap, relative, path
        if (exact and expected != actual) or relative > tolerance:
            diff.mismatches.append(f"{path}: {expected!r} != {actual!r} (relative {relative:.3g} > {tolerance:g})"
                                   if not exact else f"{path}: {expected} != {actual} (integers are exact)")
        return diff
    if expected != actual:
        diff.mismatches.append(f"{path}: {json.dumps(expected)[:80]} != {json.dumps(actual)[:80]}")
    return diff


def _get(record: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for key in path:
        record = record.get(key) if isinstance(record, dict) else None
    return record


def provenance_changes(before: Any, after: Any, path: str = "") -> list[str]:
    """The leaves of the model and software parts of two provenance records that differ, as
    "software.torch: "2.13.0" -> "2.14.0"" (names and paths are labels: not compared)."""
    if not path:
        if not isinstance(before, dict) or not isinstance(after, dict):
            return []
        return [c for key in WATCHED for c in provenance_changes(before.get(key), after.get(key), key)]
    if isinstance(before, dict) and isinstance(after, dict):
        return [c for key in sorted(before.keys() | after.keys()) if key not in UNWATCHED
                for c in provenance_changes(before.get(key), after.get(key), f"{path}.{key}")]
    return [] if before == after else [f"{path}: {json.dumps(before)} -> {json.dumps(after)}"]


def read(path: Path) -> dict[str, Any]:
    """A result file: an experiment's result.json or the viewer's JSON export (same format)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("requests"), list):
        raise ValueError(f"{path} is not a result file: it has no `requests` list "
                         "(give an experiment's result.json or a viewer JSON export)")
    return data


def source_model(source: dict[str, Any], dtype: str, device: str) -> LoadedModel:
    """Load the model a provenance's source names: a hub id at its commit, a local directory, or
    random weights with their seed."""
    kind = source.get("kind")
    if kind == "hub":
        return load_model(source["id"], revision=source.get("revision"), dtype=dtype, device=device)
    if kind == "local":
        return load_model(source["path"], dtype=dtype, device=device)
    if kind == "random":
        return load_model("gpt2", random_weights=True, seed=int(source["seed"]), dtype=dtype, device=device)
    raise ModelLoadError(f"the result does not say where its model came from (source {source!r}); give --model")


def models_for(entries: list[dict[str, Any]], override: list[str] | None, device: str) -> dict[str, LoadedModel]:
    """The models to replay on, by the names the result's answers were made with (the first is the
    default): each one's recorded source, or with `override` the models named there, in order."""
    recorded: dict[str, dict[str, Any]] = {}
    for entry in entries:
        model = _get(entry.get("provenance"), ("model",))
        if model and model["name"] not in recorded:
            recorded[model["name"]] = model
    if not recorded and not override:
        raise ModelLoadError("no request of the result carries a provenance naming its model; give --model")
    if override:
        names = list(recorded) or override
        if len(override) != len(names):
            raise ModelLoadError(f"the result used {len(names)} model(s) ({', '.join(names)}); "
                                 f"--model gave {len(override)}")
        return {name: load_model(path, device=device) for name, path in zip(names, override)}
    return {name: source_model(m["source"], m.get("dtype", "float32"), device) for name, m in recorded.items()}


def saes_for(entries: list[dict[str, Any]]) -> list[SAE]:
    """The SAEs the result's answers were made with, loaded again from their recorded sources."""
    found: dict[tuple[str, str], Any] = {}
    for entry in entries:
        model = _get(entry.get("provenance"), ("model",)) or {}
        for name, sae in (model.get("saes") or {}).items():
            found.setdefault((model["name"], name), sae)
    out = []
    for (model, name), sae in found.items():
        spec, revision = source_spec(name, model, sae["hook"], sae["source"])
        out.append(load_sae(spec, revision=revision))
    return out


@dataclass
class Verdict:
    name: str
    endpoint: str
    ok: bool
    detail: str
    warnings: list[str]


def judge(entry: dict[str, Any], outcome: Outcome) -> Verdict:
    """Whether `outcome` reproduces the recorded entry (an answer, or the same error)."""
    name, endpoint = entry.get("name", "?"), entry["endpoint"]
    warnings = provenance_changes(entry.get("provenance"), outcome.provenance)
    if "error" in entry:
        same = outcome.error == entry["error"] and outcome.status == entry.get("status", outcome.status)
        detail = "the same error" if same else f"recorded error {entry['error']!r}, now " + (
            f"{outcome.status}: {outcome.error!r}" if outcome.error else "an answer")
        return Verdict(name, endpoint, same, detail, warnings)
    if outcome.error is not None:
        return Verdict(name, endpoint, False, f"now fails ({outcome.status}): {outcome.error}", warnings)
    diff = compare(entry["response"], outcome.response)
    where = f" at {diff.where}" if diff.where else ""
    largest = f"largest difference {diff.largest:.3g}{where} (relative {diff.relative:.3g})"
    if diff.mismatches:
        shown = "; ".join(diff.mismatches[:3]) + (f"; and {len(diff.mismatches) - 3} more"
                                                   if len(diff.mismatches) > 3 else "")
        return Verdict(name, endpoint, False, f"{len(diff.mismatches)} mismatch(es): {shown}; {largest}", warnings)
    return Verdict(name, endpoint, True, largest, warnings)


def replay(args: argparse.Namespace) -> int:
    """The `replay` command: 0 when every request matches, 1 when any does not, 2 when it cannot run."""
    try:
        result = read(Path(args.result))
        entries = [e for e in result["requests"] if isinstance(e, dict) and "endpoint" in e and "request" in e]
        client: Client
        if args.against:
            client = Remote(args.against)
        else:
            models = models_for(entries, args.model, args.device)
            client = InProcess(create_app({"TESTING": True, "SAES": saes_for(entries)}, model=models))
    except (OSError, ValueError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdicts = [judge(e, execute(client, e["endpoint"], e["request"])) for e in entries]
    for warning in dict.fromkeys(w for v in verdicts for w in v.warnings):
        print(f"warning: provenance differs from the recorded one: {warning}")
    for v in verdicts:
        print(f"{'MATCH   ' if v.ok else 'MISMATCH'} {v.name} ({v.endpoint}): {v.detail}")
    failed = sum(not v.ok for v in verdicts)
    print(f"{len(verdicts) - failed} of {len(verdicts)} requests match" + ("" if not failed else "; see above"))
    if args.json:
        Path(args.json).write_text(json.dumps([v.__dict__ for v in verdicts], indent=1) + "\n")
    return 1 if failed else 0
