"""Experiment files and replay (issue 22): `python -m explorer run` writes every request's answer,
its provenance, the resolved configuration and figures carrying their provenance; a failing
request is recorded while the others run; `replay` re-runs a result in-process or against a
server and reports, within the documented precision, where an answer differs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from explorer.experiments.cli import main
from explorer.experiments.figures import read_provenance
from explorer.experiments.replay import compare
from explorer.operations import OPERATIONS
from explorer.web.server import create_app
from tests.helpers import TEXT, assert_same_answer, waitress_serving

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "experiments").glob("*.yaml"))


def run(experiment: Path, model: Path, out: Path, *extra: str) -> int:
    return main(["run", str(experiment), "--model", str(model), "--device", "cpu", "--out", str(out),
                 "--tag", "t", *extra])


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Every example experiment, run once on the tiny model: {experiment: its run folder}."""
    out = tmp_path_factory.mktemp("runs")
    found = {}
    for experiment in EXAMPLES:
        assert run(experiment, tiny_dir, out) == 0, experiment
        found[experiment.stem] = out / yaml.safe_load(experiment.read_text())["name"] / "t"
    return found


def test_there_are_the_three_documented_examples():
    assert [p.stem for p in EXAMPLES] == ["eiffel-causal-trace", "fact-lens", "ioi-patching"]


@pytest.mark.parametrize("experiment", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_each_example_writes_answers_provenance_config_and_figures(results, client, experiment, tiny_dir):
    spec = yaml.safe_load(experiment.read_text())
    folder = results[experiment.stem]
    result = json.loads((folder / "result.json").read_text())
    assert result["format"] == "explorer-result/1" and result["experiment"] == spec["name"]
    assert [e["name"] for e in result["requests"]] == [r["name"] for r in spec["requests"]]
    for entry, asked in zip(result["requests"], spec["requests"]):
        body = {k: v for k, v in asked.items() if k not in ("name", "endpoint")}
        assert entry["endpoint"] == asked["endpoint"] and entry["request"] == body
        # the same answer the server gives over HTTP (a job's result for long operations)
        over_http = client.post(entry["endpoint"], json=body)
        assert over_http.status_code == 200
        assert_same_answer(over_http.get_json(), entry["response"])
        record = entry["provenance"]
        assert record["endpoint"] == entry["endpoint"] and record["model"]["source"]["path"] == str(tiny_dir)
        assert {k: v for k, v in record["request"].items() if k not in ("provenance", "async")} == body
        assert entry["figures"] == [f"{entry['name']}.png", f"{entry['name']}.svg"]
        for figure in entry["figures"]:
            assert read_provenance(folder / figure) == [record]
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model"] == [str(tiny_dir)] and len(config["requests"]) == len(spec["requests"])
    for resolved, asked in zip(config["requests"], spec["requests"]):  # the file's fields and every default
        fields = {f.alias or n for n, f in OPERATIONS[asked["endpoint"]].request.model_fields.items()}
        assert set(resolved) == {"name", "endpoint"} | fields - {"provenance", "async"}
        assert {**resolved, **asked} == resolved
    assert config["models"][str(tiny_dir)]["source"]["kind"] == "local"


def test_a_failing_request_is_recorded_and_the_others_still_run(tiny_dir, tmp_path):
    experiment = write(tmp_path / "mixed.yaml", {"requests": [
        {"name": "first", "endpoint": "/tokenize", "text": TEXT},
        {"name": "broken", "endpoint": "/attention", "text": TEXT, "layer": 99},
        {"name": "last", "endpoint": "/predict", "text": TEXT, "token_index": 2},
    ]})
    assert run(experiment, tiny_dir, tmp_path) == 1
    entries = json.loads((tmp_path / "mixed" / "t" / "result.json").read_text())["requests"]
    assert [("response" in e, "error" in e) for e in entries] == [(True, False), (False, True), (True, False)]
    assert entries[1]["status"] == 400 and entries[1]["error"] == "layer must be between 0 and 2, got 99"
    assert (tmp_path / "mixed" / "t" / "last.png").exists()


@pytest.mark.parametrize("spec, message", [
    ({"requests": [{"name": "a", "endpoint": "/nowhere"}]}, "endpoint must be one of"),
    ({"requests": [{"name": "a", "endpoint": "/tokenize"}, {"name": "a", "endpoint": "/tokenize"}]}, "used twice"),
    ({"requests": []}, "requests must be a non-empty list"),
    ({"requests": [{"name": "../up", "endpoint": "/tokenize"}]}, "name must be"),
    ({"model": "gpt2", "extra": 1, "requests": [{"name": "a", "endpoint": "/tokenize"}]}, "unknown keys ['extra']"),
])
def test_an_invalid_file_is_refused_before_loading_anything(tmp_path, capsys, spec, message):
    assert main(["run", str(write(tmp_path / "bad.yaml", spec)), "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_replay_of_a_fresh_result_matches_exactly(results, tmp_path):
    for folder in results.values():
        report = tmp_path / f"{folder.parent.name}.json"
        assert main(["replay", str(folder / "result.json"), "--device", "cpu", "--json", str(report)]) == 0
        verdicts = json.loads(report.read_text())
        assert verdicts and all(v["ok"] and v["warnings"] == [] for v in verdicts)
        assert all(v["detail"] == "largest difference 0 (relative 0)" for v in verdicts)


def test_replay_on_other_weights_fails_with_a_clear_report(results, other_model, tmp_path, capsys):
    folder = results["fact-lens"]
    assert main(["replay", str(folder / "result.json"), "--model", other_model.path, "--json",
                 str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "warning: provenance differs from the recorded one: model.source.sha256" in out
    assert "MISMATCH paris-trajectory (/lens)" in out and "0 of 2 requests match" in out
    verdicts = json.loads((tmp_path / "r.json").read_text())
    assert all(not v["ok"] and "mismatch(es)" in v["detail"] and "largest difference" in v["detail"] for v in verdicts)


def test_replay_against_a_running_server(results, tiny_model, capsys):
    with waitress_serving(create_app({"TESTING": True}, model=tiny_model)) as server:
        url = f"http://127.0.0.1:{server.effective_port}"
        assert main(["replay", str(results["ioi-patching"] / "result.json"), "--against", url]) == 0
    assert "2 of 2 requests match" in capsys.readouterr().out


def test_replay_reports_a_recorded_error_reproduced(tiny_dir, tmp_path, capsys):
    experiment = write(tmp_path / "err.yaml", {"requests": [
        {"name": "broken", "endpoint": "/attention", "text": TEXT, "layer": 99}]})
    assert run(experiment, tiny_dir, tmp_path) == 1
    # the failed request carries no provenance: the model is named on the command line
    assert main(["replay", str(tmp_path / "err" / "t" / "result.json"), "--model", str(tiny_dir)]) == 0
    assert "MATCH    broken (/attention): the same error" in capsys.readouterr().out


def test_compare_applies_the_documented_precision():
    assert not compare({"x": [1.0, 2.0]}, {"x": [1.0, 2.0 + 1.9e-5]}).mismatches  # 9.5e-6 of the field's 2.0
    assert compare({"x": [1.0, 2.0]}, {"x": [1.0, 2.0 + 2.1e-5]}).mismatches
    near_zero = compare({"x": [1e-7, 1.0]}, {"x": [2e-7, 1.0]})  # relative to the field's scale, not the cell's
    assert not near_zero.mismatches and near_zero.where == "x[0]"
    assert not compare({"attention_matrix": [0.5]}, {"attention_matrix": [0.5004]}).mismatches  # float16
    assert compare({"attention_matrix": [0.5]}, {"attention_matrix": [0.5006]}).mismatches
    assert compare({"logit": 0.5}, {"logit": 0.5004}).mismatches
    assert compare({"token_id": 3}, {"token_id": 4}).mismatches == ["token_id: 3 != 4 (integers are exact)"]
    assert compare({"a": 1, "b": "x"}, {"a": 1}).mismatches == ["b: missing"]
    assert compare({"a": [1, 2]}, {"a": [1]}).mismatches == ["a: length 2 != 1"]
    assert compare({"t": ["a"]}, {"t": ["b"]}).mismatches == ['t[0]: "a" != "b"']


def test_every_post_endpoint_can_be_named_in_an_experiment(tmp_path):
    from explorer.experiments.run import load

    spec = {"requests": [{"name": f"r{i}", "endpoint": p} for i, p in enumerate(OPERATIONS)]}
    assert [r["endpoint"] for r in load(write(tmp_path / "all.yaml", spec)).requests] == list(OPERATIONS)


def test_the_command_line_help():
    out = subprocess.run([sys.executable, "-m", "explorer", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "run EXPERIMENT.yaml" in out.stdout and "replay RESULT.json" in out.stdout
    out = subprocess.run([sys.executable, "-m", "explorer", "run", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--random-weights" in out.stdout and "--tag" in out.stdout


def test_an_experiment_with_an_sae_records_it_and_replays_it(tiny_dir, tmp_path):
    """The file names its SAE (`sae:`); answers' provenance carries the SAE's source, and replay
    loads it again from there."""
    from model_utils import write_random_sae

    sae = write_random_sae(tmp_path / "sae", d_in=64, d_sae=32, hook="blocks.1.hook_resid_pre", scale=0.3)
    spec = write(tmp_path / "f.yaml", {"name": "f", "sae": f"name=s,{sae}", "requests": [
        {"name": "read", "endpoint": "/features", "text": TEXT, "sae": "s", "top_k": 3},
        {"name": "edit", "endpoint": "/feature", "text": TEXT, "sae": "s", "index": 2, "answer": " mat",
         "edit": "ablate", "indices": [0, 1, 2]}]})
    assert run(spec, tiny_dir, tmp_path / "out") == 0
    folder = tmp_path / "out" / "f" / "t"
    result = json.loads((folder / "result.json").read_text())
    for entry in result["requests"]:
        assert "error" not in entry, entry
        assert entry["provenance"]["model"]["saes"]["s"]["source"]["path"] == str(sae)
    assert "saes" in next(iter(yaml.safe_load((folder / "config.yaml").read_text())["models"].values()))
    assert main(["replay", str(folder / "result.json"), "--device", "cpu"]) == 0
