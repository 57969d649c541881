"""`python -m explorer run EXPERIMENT.yaml`: a file of named requests run in-process through the
server's own app, written as `OUT/<experiment>/<tag>/`: `result.json` (every request, its answer
or error, and its provenance), `config.yaml` (the resolved configuration: models and their sources, flags, every request with
its defaults filled in) and one PNG and SVG
figure per request that `explorer/plots.py` can draw, each carrying its provenance.

An experiment file:

    name: ioi-patching             # optional; default: the file's name
    model: gpt2                    # optional: a name or a list (the first is the default);
                                   # --model overrides it, and the default is gpt2
    random_weights: false          # optional; --random-weights turns it on
    requests:
      - name: heads                # unique; names the figure files
        endpoint: /patch           # any POST endpoint
        clean: When Mary and John went to the store, John gave a drink to
        corrupt: When Mary and John went to the store, Mary gave a drink to
        answer: " Mary"
        site: heads                # ... the rest is the body, exactly as over HTTP
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import yaml

from ..errors import InvalidRequest
from ..operations import OPERATIONS, parse
from ..runtime.loading import ModelLoadError
from ..runtime.provenance import now
from ..web.server import create_app, load_configured, model_config, model_names
from .client import InProcess, Outcome, content, execute
from .figures import save_figure

FORMAT = "explorer-result/1"  # result.json and the viewer's JSON export
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # becomes a directory or file name


class ExperimentError(ValueError):
    """The experiment file is not valid; the message names the entry and the field."""


@dataclass
class Experiment:
    name: str
    models: list[str] | None
    saes: list[str]  # --sae values, e.g. "name=res8,jbloom/GPT2-Small-SAEs-Reformatted:blocks.8.hook_resid_pre"
    random_weights: bool
    requests: list[dict[str, Any]]  # each {"name", "endpoint", "body"}


def load(path: Path) -> Experiment:
    """Read and check an experiment file (ExperimentError naming what is wrong)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExperimentError(f"{path}: cannot read it as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ExperimentError(f"{path}: the file must be a mapping with a `requests` list")
    unknown = set(data) - {"name", "model", "sae", "random_weights", "requests"}
    if unknown:
        raise ExperimentError(f"{path}: unknown keys {sorted(unknown)}; allowed: name, model, sae, random_weights, "
                              "requests")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name):
        raise ExperimentError(f"{path}: name must be letters, digits, '.', '_' or '-', got {name!r}")
    models = data.get("model")
    if models is not None:
        models = [models] if isinstance(models, str) else models
        if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
            raise ExperimentError(f"{path}: model must be a model name or a list of names")
    saes = data.get("sae", [])
    saes = [saes] if isinstance(saes, str) else saes
    if not isinstance(saes, list) or not all(isinstance(s, str) and s for s in saes):
        raise ExperimentError(f"{path}: sae must be an --sae value or a list of them")
    random_weights = data.get("random_weights", False)
    if not isinstance(random_weights, bool):
        raise ExperimentError(f"{path}: random_weights must be true or false")
    entries = data.get("requests")
    if not isinstance(entries, list) or not entries:
        raise ExperimentError(f"{path}: requests must be a non-empty list")
    requests, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: requests[{i}]"
        if not isinstance(entry, dict):
            raise ExperimentError(f"{where} must be a mapping with name, endpoint and the body's fields")
        body = dict(entry)
        request_name, endpoint = body.pop("name", None), body.pop("endpoint", None)
        if not isinstance(request_name, str) or not NAME.match(request_name):
            raise ExperimentError(f"{where}: name must be letters, digits, '.', '_' or '-', got {request_name!r}")
        if request_name in seen:
            raise ExperimentError(f"{where}: the name {request_name!r} is used twice")
        seen.add(request_name)
        if endpoint not in OPERATIONS:
            raise ExperimentError(f"{where} ({request_name}): endpoint must be one of {', '.join(OPERATIONS)}, "
                                  f"got {endpoint!r}")
        requests.append({"name": request_name, "endpoint": endpoint, "body": body})
    return Experiment(name, models, saes, random_weights, requests)


class Progress:
    """One line per request on `stream`: a bar redrawn in place on a terminal, the outcome at the end."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream = total, stream
        self.live = stream.isatty()
        self.label = ""

    def start(self, i: int, label: str) -> None:
        self.label = f"[{i + 1}/{self.total}] {label}"
        self.update(0.0)

    def update(self, fraction: float) -> None:
        if self.live:
            filled = int(round(fraction * 30))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}")
            self.stream.flush()

    def end(self, outcome: Outcome) -> None:
        result = f"ok in {outcome.seconds:.1f} s" if outcome.error is None else \
            f"FAILED ({outcome.status}): {outcome.error}"
        self.stream.write(("\r\033[K" if self.live else "") + f"{self.label}: {result}\n")
        self.stream.flush()


def record(name: str, endpoint: str, body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """One entry of a result's `requests` (the format replay reads)."""
    out: dict[str, Any] = {"name": name, "endpoint": endpoint, "request": content(body)}
    if outcome.error is None:
        out.update(response=outcome.response, provenance=outcome.provenance)
    else:
        out.update(status=outcome.status, error=outcome.error)
    out["seconds"] = round(outcome.seconds, 3)
    return out


def resolved_body(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with every field the endpoint has, defaults filled in (as given when it is invalid)."""
    try:
        parsed = parse(OPERATIONS[endpoint].request, content(body))
    except InvalidRequest:
        return body
    return content(parsed.model_dump(by_alias=True))


def run(args: argparse.Namespace) -> int:
    """The `run` command: 0 when every request succeeded, 1 when any failed, 2 for a bad file."""
    try:
        experiment = load(Path(args.experiment))
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # --model, else the file's model, else EXPLORER_MODEL, else gpt2
    args.model = model_names(args.model or experiment.models or os.environ.get("EXPLORER_MODEL", "gpt2"))
    if len(set(args.model)) != len(args.model):
        print(f"error: a model is named twice: {', '.join(args.model)}", file=sys.stderr)
        return 2
    args.random_weights = args.random_weights or experiment.random_weights
    args.sae = args.sae or experiment.saes  # --sae, else the file's
    config = model_config(args)
    models = load_configured(config)
    if models is None:
        return 1
    try:
        app = create_app({**config, "TESTING": True}, model=models)
    except ModelLoadError as exc:  # an SAE that does not fit its model
        print(f"\nerror: {exc}\n", file=sys.stderr)
        return 1
    tag = args.tag or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / experiment.name / tag
    out.mkdir(parents=True, exist_ok=True)
    client = InProcess(app)
    progress = Progress(len(experiment.requests))
    entries = []
    for i, req in enumerate(experiment.requests):
        progress.start(i, f"{req['name']} ({req['endpoint']})")
        outcome = execute(client, req["endpoint"], req["body"], progress.update)
        progress.end(outcome)
        entry = record(req["name"], req["endpoint"], req["body"], outcome)
        if outcome.response is not None:
            try:
                figures = save_figure(req["endpoint"], outcome.response, outcome.provenance, out / req["name"])
            except (ValueError, KeyError, TypeError) as exc:  # this answer has no figure (e.g. no compare)
                entry["figure_error"] = str(exc)
                figures = []
            entry["figures"] = [p.name for p in figures]
        entries.append(entry)
    resolved = {"name": experiment.name, "tag": tag, "source": str(Path(args.experiment).resolve()),
                "model": config["MODEL"], "random_weights": config["RANDOM_WEIGHTS"], "device": config["DEVICE"],
                "dtype": config["DTYPE"], "device_map": config["DEVICE_MAP"],
                "models": {ex.model.name: ex.describe() for ex in app.extensions["models"].by_name.values()},
                "requests": [{"name": r["name"], "endpoint": r["endpoint"], **resolved_body(r["endpoint"], r["body"])}
                             for r in experiment.requests]}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    result = {"format": FORMAT, "experiment": experiment.name, "tag": tag, "created": now(), "requests": entries}
    (out / "result.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    failed = [e["name"] for e in entries if "error" in e]
    print(f"{len(entries) - len(failed)} of {len(entries)} requests succeeded; wrote {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
