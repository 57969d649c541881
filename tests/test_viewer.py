"""The browser viewer at GET /, driven in real headless Chromium against the app on the tiny model.

Every count the page shows is checked against the API's own answer for the same request.
Screenshots of each view land in test-artifacts/. Skipped when Chromium or Playwright is missing
(.ci/run installs Chromium so CI runs these).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import pytest
from PIL import Image
from werkzeug.serving import make_server

from app import create_app
from explorer.experiments.figures import read_provenance
from explorer.math import generation
from tests import helpers
from tests.helpers import CLEAN, CORPUS, CORRUPT, FACT, PAIR, TEXT, ok, running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 15_000

pytestmark = pytest.mark.slow  # a real browser

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def serving(model, config: dict | None = None):
    """The real app (same factory as `python app.py`) on a free loopback port, in a thread."""
    app = create_app(config, model=model)
    with running(make_server("127.0.0.1", 0, app, threaded=True)) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}", app.test_client()


@pytest.fixture(scope="module")
def server(tiny_model):
    yield from serving(tiny_model)


@pytest.fixture(scope="module")
def two_server(tiny_model, other_model):
    """Two tiny models (other weights) in one server: "tiny-a" (the default) and "tiny-b"."""
    yield from serving({"tiny-a": tiny_model, "tiny-b": other_model})


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, server):
    yield from viewer_page(browser, server)


@pytest.fixture()
def two_page(browser, two_server):
    yield from viewer_page(browser, two_server)


def viewer_page(browser, server):
    """A fresh page on the viewer, its first (default text) analysis done; fails the test on any
    uncaught script error, console error or failed page asset."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # API errors are expected in some tests (and checked there); Chromium also logs them.
    page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith("Failed to load resource")
            and problems.append(f"console: {msg.text}"))
    page.on("response", lambda r: r.status >= 400 and r.request.method == "GET"
            and problems.append(f"GET {r.url}: {r.status}"))
    page.goto(server[0] + "/")
    page.wait_for_selector("#panel-trajectories .figure")
    yield page
    context.close()
    assert not problems, problems


def api(server, path: str, body: dict) -> dict:
    return ok(server[1].post(path, json=body))


def analyze(page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")
    page.wait_for_function("t => document.querySelector('#token-count').textContent.length > 0 && "
                           "document.querySelector('#tokens').getAttribute('aria-busy') === 'false'",
                           arg=text)


def open_view(page, name: str):
    page.click(f"#tab-{name}")
    panel = page.locator(f"#panel-{name}")
    panel.locator(".figure").wait_for()
    page.wait_for_function(f"document.querySelector('#panel-{name}').getAttribute('aria-busy') === 'false'")
    return panel


def choose(page, panel, select: str, value: str) -> None:
    """Pick an option of a view's control and wait until the view has redrawn."""
    old = panel.locator("svg.figure").element_handle()
    page.select_option(select, value)
    page.wait_for_function("old => !old.isConnected", arg=old)
    panel.locator("svg.figure").wait_for()


def hover_text(page, locator) -> str:
    """The tooltip shown while the mouse is over `locator`."""
    locator.hover()
    return page.locator("#tip").inner_text()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"viewer-{name}.png"), full_page=True)


def test_model_and_token_chips(page, server):
    info = server[1].get("/model").get_json()
    header = page.locator("#model").inner_text()
    assert info["name"] in header and f"{info['n_layers']} layers" in header and f"· {info['family']} ·" in header
    # The tiny model is a save_pretrained directory: "local", its path on hover, no random warning.
    assert page.locator("#random-warning").is_hidden()
    assert info["weights"] == "local"
    assert page.locator(".weights.local").inner_text() == "local weights"
    assert info["path"] in page.locator(".weights.local").get_attribute("title")

    analyze(page, TEXT)
    tokens = api(server, "/tokenize", {"text": TEXT})["tokens"]
    chips = page.locator("#chips .chip")
    assert chips.count() == len(tokens)
    assert page.locator("#chips .chip.bos").count() == 1
    assert chips.nth(0).inner_text() == "BOS"
    assert f"id {tokens[2]['token_id']}" in chips.nth(2).get_attribute("title")


def serve_model_info(page, info: dict) -> None:
    """Reload the page with GET /models (what the viewer reads at start) answering `info` alone."""
    page.route("**/models", lambda route: route.fulfill(json={"default": info["name"], "models": [info]}))
    page.reload()


@pytest.mark.parametrize("change,traced", [
    ({"prepends_bos": False, "bos_token_id": None}, lambda n: list(range(n))),  # Pythia, Qwen: index 0 is text
    ({"causal": False}, lambda n: list(range(1, n - 1))),  # BERT: [CLS] ... [SEP]
])
def test_token_chips_follow_the_models_special_tokens(page, server, change, traced):
    info = {**server[1].get("/model").get_json(), **change}
    serve_model_info(page, info)
    analyze(page, TEXT)
    chips = page.locator("#chips .chip")
    n = len(api(server, "/tokenize", {"text": TEXT})["tokens"])
    assert chips.count() == n and page.locator("#chips .chip.bos").count() == 0
    pressed = [i for i in range(n) if chips.nth(i).get_attribute("aria-pressed") == "true"]
    assert pressed == traced(n)
    assert f"· {info['family']}" in page.locator("#model").inner_text()


def test_random_weights_are_flagged(page, server):
    # The tiny model is a saved checkpoint; answer /models as a --random-weights server would.
    info = {**server[1].get("/model").get_json(), "weights": "random"}
    serve_model_info(page, info)
    page.locator("#random-warning").wait_for(state="visible")
    assert page.locator(".weights.random").inner_text() == "RANDOM WEIGHTS"


def test_hub_weights_chip(page, server):
    info = {**server[1].get("/model").get_json(), "weights": "pretrained", "path": None}
    serve_model_info(page, info)
    page.locator(".weights.pretrained").wait_for()
    assert page.locator(".weights.pretrained").inner_text() == "pretrained weights"
    assert page.locator("#random-warning").is_hidden()


def test_trajectories(page, server):
    panel = open_view(page, "trajectories")
    answer = api(server, "/trace", {"text": page.input_value("#text")})
    n_layers = len(next(iter(answer["trajectories"].values())))
    assert panel.locator("circle.point").count() == len(answer["tokens"]) * n_layers
    assert panel.locator("g.trajectory").count() == len(answer["tokens"])
    ev1, ev2 = answer["pca_explained_variance"]
    assert f"PC1 ({ev1 * 100:.1f}% of variance)" in panel.locator("svg").text_content()
    assert "layer 1" in hover_text(page, panel.locator("circle.point").nth(1))
    screenshot(page, "trajectories")

    # Deselecting a token chip re-traces without it.
    page.locator("#chips .chip").nth(1).click()
    page.wait_for_function(f"document.querySelectorAll('#panel-trajectories g.trajectory').length === "
                           f"{len(answer['tokens']) - 1}")


def test_many_traced_tokens_keep_the_plot_readable(page, server):
    text = "one two three four five six seven eight nine ten " * 4
    analyze(page, text)
    panel = open_view(page, "trajectories")
    n = len(api(server, "/trace", {"text": text})["tokens"])
    rows = (520 - 50 - 48) // 18  # legend rows beside the plot: the last counts the rest
    assert n > rows
    svg = panel.locator("svg.figure")
    assert svg.get_attribute("height") == "520"  # the same plot as for a short text
    assert panel.locator("circle.legend").count() == rows - 1
    assert f"… and {n - rows + 1} more tokens" in svg.text_content()
    assert panel.locator("g.trajectory").count() == n
    screenshot(page, "trajectories-many")


def test_attention(page, server):
    analyze(page, TEXT)
    panel = open_view(page, "attention")
    choose(page, panel, "#attn-layer", "2")
    answer = api(server, "/attention", {"text": TEXT, "layer": 2})
    n_tokens = len(answer["tokens"])
    assert panel.locator("rect.cell").count() == n_tokens * n_tokens
    assert panel.locator(".head-tile").count() == answer["n_heads"]

    # A head tile picks the heatmap's head; the hovered cell reads the API's value.
    panel.locator('.head-tile[data-head="3"]').click()
    page.wait_for_function("document.querySelector('#attn-head').value === '3'")
    tip = hover_text(page, panel.locator("rect.cell").nth(n_tokens + 1))  # query 1, key 1
    assert float(tip.rsplit(": ", 1)[1]) == answer["attention_matrix"][3][1][1]

    # Keyboard: focus the figure, go to the first cell, then one row down; the readout follows.
    panel.locator("svg.figure").focus()
    page.keyboard.press("Home")
    page.keyboard.press("ArrowDown")
    assert panel.locator(".readout").inner_text().startswith("query #1")
    screenshot(page, "attention")


def test_logit_lens(page, server):
    analyze(page, TEXT)
    panel = open_view(page, "lens")
    choose(page, panel, "#lens-k", "3")
    position = int(page.input_value("#lens-pos"))
    answer = api(server, "/predict", {"text": TEXT, "token_index": position, "top_k": 3})
    rows = answer["predictions_by_layer"]
    assert panel.locator(".lens-row").count() == len(rows) == server[1].get("/model").get_json()["n_layers"]
    assert panel.locator(".lens-cell").count() == len(rows) * 3
    top = rows[-1]["top_tokens"][0]
    assert f"id {top['token_id']}" in hover_text(page, panel.locator(".lens-row").last.locator(".lens-cell").first)
    screenshot(page, "lens")


def test_loading_indicator(page):
    held = []  # the /predict request, held back until the indicator has been seen
    page.route("**/predict", lambda route: held.append(route))
    page.click("#tab-lens")
    page.locator("#panel-lens .loading").wait_for(state="visible")
    assert len(held) == 1 and page.locator("#panel-lens .figure").count() == 0
    held[0].continue_()
    page.locator("#panel-lens .figure").wait_for()
    assert page.locator("#panel-lens .loading").is_hidden()


# What each view sends at first besides the text, for a text of n tokens (BOS included).
@pytest.mark.parametrize("view, path, params", [
    ("trajectories", "/trace", lambda n: {"token_indices": list(range(1, n))}),  # the text's own tokens
    ("attention", "/attention", lambda n: {"layer": 0, "head": None}),
    ("lens", "/predict", lambda n: {"token_index": n - 1, "top_k": 5}),  # the last token
    ("heads", "/ablate", lambda n: {"answer": " Mary", "distractor": " John", "method": "mean", "site": "heads"}),
])
def test_exports(page, server, view, path, params):
    panel = open_view(page, view)
    exported = download_exports(page, panel, f"export-{view}")
    text = page.input_value("#text")
    n = len(api(server, "/tokenize", {"text": text})["tokens"])
    check_requests(server, exported, [(path, {"text": text, **params(n)})])


def test_a_viewer_export_replays(page, server, capsys):
    """`python -m explorer replay` reads a viewer's JSON export: its answers match a fresh run."""
    from explorer.experiments.cli import main

    download_exports(page, open_view(page, "attention"), "export-replay")
    assert main(["replay", str(ARTIFACTS / "export-replay.json"), "--device", "cpu"]) == 0
    assert "MATCH    " in capsys.readouterr().out


def test_api_error_is_shown(page, server):
    long_text = "word " * 100  # over the tiny model's 64-token context
    message = server[1].post("/tokenize", json={"text": long_text}).get_json()["error"]
    page.fill("#text", long_text)
    page.click("#analyze")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == message
    assert page.locator("#chips .chip").count() == 0
    assert page.locator("#panel-trajectories .figure").count() == 0
    screenshot(page, "error")

    analyze(page, TEXT)  # the next good request clears it
    assert error.is_hidden()


def test_stale_error_does_not_cover_a_newer_answer(page, server):
    """A request overtaken by a newer one of the same view fails late: its error stays hidden."""
    held = []
    page.route("**/predict", lambda route: held.append(route) if not held else route.continue_())
    page.click("#tab-lens")
    page.locator("#panel-lens .loading").wait_for(state="visible")
    assert len(held) == 1
    panel = page.locator("#panel-lens")
    page.select_option("#lens-pos", "1")  # the newer request, answered at once
    panel.locator(".figure").wait_for()
    held[0].fulfill(status=400, content_type="application/json", body=json.dumps({"error": "stale failure"}))
    page.wait_for_function("document.querySelector('#panel-lens').getAttribute('aria-busy') === 'false'")
    assert page.locator("#error").is_hidden()
    assert panel.locator(".lens-row").count() == server[1].get("/model").get_json()["n_layers"]


def test_export_of_answers_without_provenance(page, server):
    """A view whose data holds no provenance record still exports: no requests, the data itself."""
    page.route("**/predict", lambda route: route.fulfill(
        json={k: v for k, v in route.fetch().json().items() if k != "provenance"}))
    panel = open_view(page, "lens")
    exported = download_exports(page, panel, "export-lens-without-provenance")
    text = page.input_value("#text")
    n = len(api(server, "/tokenize", {"text": text})["tokens"])
    assert exported["requests"] == []
    assert exported["data"] == api(server, "/predict", {"text": text, "token_index": n - 1, "top_k": 5})


# --- Heads view -----------------------------------------------------------------------------------

def numbers(text: str) -> list[float]:
    """The numbers a tooltip shows (4 significant digits), in order."""
    return [float(n) for n in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", text)]


def show_heads(page, panel, mode: str) -> None:
    """Switch the Heads view to `mode` and wait until it has redrawn."""
    old = panel.locator("svg.figure").element_handle()
    page.select_option("#heads-show", mode)
    if old is not None:
        page.wait_for_function("old => !old.isConnected", arg=old)
    panel.locator("svg.figure").wait_for()


def test_heads_ablation(page, server):
    analyze(page, CLEAN)
    panel = open_view(page, "heads")
    answer = api(server, "/ablate", {"text": CLEAN, "answer": " Mary", "distractor": " John"})
    n_layers, n_heads = len(answer["effect"]), len(answer["effect"][0])
    assert panel.locator("rect.head-cell").count() == n_layers * n_heads
    assert panel.locator("circle.scatter-point").count() == 0  # no scatter for ablation
    tip = hover_text(page, panel.locator('rect.head-cell[data-layer="1"][data-head="2"]'))
    assert tip.startswith("L1 H2: ablation effect")
    assert numbers(tip)[-1] == pytest.approx(answer["effect"][1][2], rel=1e-3)
    choose(page, panel, "#heads-method", "zero")
    zero = api(server, "/ablate", {"text": CLEAN, "answer": " Mary", "distractor": " John", "method": "zero"})
    assert numbers(hover_text(page, panel.locator("rect.head-cell").first))[-1] == pytest.approx(zero["effect"][0][0], rel=1e-3)
    screenshot(page, "heads-ablation")


def test_heads_attribution_patching_and_scatter(page, server):
    analyze(page, CLEAN)
    panel = open_view(page, "heads")
    page.select_option("#heads-show", "attribution")  # asks for the corrupt prompt first
    page.wait_for_function("document.querySelector('#heads-status').textContent.includes('corrupt prompt')")
    page.fill("#heads-corrupt", CORRUPT)
    page.press("#heads-corrupt", "Enter")
    panel.locator("circle.scatter-point").first.wait_for()
    answer = api(server, "/attribution_patch", {**PAIR, "site": "heads", "compare": True})
    n_layers, n_heads = len(answer["attribution"]), len(answer["attribution"][0])
    assert panel.locator("rect.head-cell").count() == panel.locator("circle.scatter-point").count() == n_layers * n_heads
    assert panel.locator(".heads-correlation").text_content() == f"Pearson r = {answer['pearson']:.3f}"
    tip = hover_text(page, panel.locator("rect.head-cell").nth(n_heads + 1))  # L1 H1
    real = answer["exact_effect"][1][1] - answer["corrupt_metric"]
    assert tip.startswith("L1 H1: attribution estimate")
    shown, estimate, exact = numbers(tip)[-3:]
    assert shown == estimate == pytest.approx(answer["attribution"][1][1], rel=1e-3)
    assert exact == pytest.approx(real, rel=1e-3)
    # a scatter point reads the same head
    assert hover_text(page, panel.locator("circle.scatter-point").nth(n_heads + 1)) == tip
    screenshot(page, "heads-attribution")
    exported = download_exports(page, panel, "export-heads-attribution")
    check_requests(server, exported, [("/attribution_patch", {"clean": CLEAN, "corrupt": CORRUPT, "answer": " Mary",
                                                              "distractor": " John", "site": "heads", "compare": True})])
    show_heads(page, panel, "patching")
    tip = hover_text(page, panel.locator("rect.head-cell").nth(n_heads + 1))
    assert tip.startswith("L1 H1: real patching") and numbers(tip)[-3] == pytest.approx(real, rel=1e-3)


def test_heads_without_corrupt_prompt_asks_for_one(page):
    panel = open_view(page, "heads")
    page.select_option("#heads-show", "attribution")
    page.wait_for_function("document.querySelector('#heads-status').textContent.includes('corrupt prompt')")
    assert panel.locator("svg.figure").count() == 0 and page.locator("#error").is_hidden()


def test_heads_chg_job_with_progress_and_taxonomy(page, server):
    analyze(page, CLEAN)
    panel = open_view(page, "heads")
    page.select_option("#heads-show", "chg")
    page.wait_for_function("document.querySelector('#heads-status').textContent.includes('Train CHG')")
    page.fill("#heads-steps", "40")
    with page.expect_response("**/jobs/chg") as started:
        page.click("#heads-run")
    job = started.value.json()["job"]
    page.wait_for_function("document.querySelector('#heads-progress').value > 0")
    assert page.locator("#heads-run").is_disabled()
    panel.locator("svg.figure").wait_for(timeout=60_000)
    result = server[1].get(f"/jobs/{job}").get_json()["result"]
    counts = result["counts"]
    assert page.locator("#heads-status").inner_text().startswith(f"done: {counts['facilitating']} facilitating")
    assert page.locator("#heads-progress").evaluate("p => p.value") == 1
    labels = panel.locator("rect.head-cell").evaluate_all("cells => cells.map(c => c.dataset.role)")
    assert labels == [role for row in result["taxonomy"] for role in row]
    tip = hover_text(page, panel.locator("rect.head-cell").first)
    assert tip.startswith("L0 H0: CHG gate") and result["taxonomy"][0][0] in tip
    assert numbers(tip)[-3] == pytest.approx(result["gates"]["toward_zero"][0][0], rel=1e-3)
    screenshot(page, "heads-chg")
    exported = download_exports(page, panel, "export-heads-chg")  # the job's result
    check_requests(server, exported, [("/jobs/chg", {"texts": [CLEAN], "targets": [" Mary"], "steps": 40})])


def test_heads_chg_cancel(page, server):
    panel = open_view(page, "heads")
    page.select_option("#heads-show", "chg")
    page.fill("#heads-steps", "1000")
    page.click("#heads-run")
    page.wait_for_function("document.querySelector('#heads-progress').value > 0")
    page.click("#heads-cancel")
    page.wait_for_function("document.querySelector('#heads-status').textContent === 'cancelled'")
    assert not page.locator("#heads-run").is_disabled() and panel.locator("svg.figure").count() == 0


def test_heads_ioi_example_fills_the_pair(page):
    page.click("#tab-heads")
    page.click("#heads-example")
    page.wait_for_function(f"document.querySelector('#token-count').textContent.length > 0 && "
                           f"document.querySelector('#text').value === {json.dumps(CLEAN)}")
    assert page.input_value("#heads-corrupt") == CORRUPT and page.input_value("#heads-answer") == " Mary"
# --- logit lens grid, surprisal chips, attribution --------------------------------------------

def download_exports(page, panel, stem: str) -> dict:
    """Click a view's PNG, SVG and JSON downloads; check the formats: the JSON an explorer-result/1
    named after the view, whose provenance records the PNG and SVG carry too. The JSON, parsed."""
    saved, names = {}, set()
    for fmt in ("png", "svg", "json"):
        with page.expect_download() as download:
            panel.locator(f'.exports button[data-export="{fmt}"]').click()
        target = ARTIFACTS / f"{stem}.{fmt}"
        ARTIFACTS.mkdir(exist_ok=True)
        download.value.save_as(target)
        saved[fmt] = target
        names.add(download.value.suggested_filename.rsplit(".", 1)[0])
    assert saved["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(saved["png"]).verify()  # every chunk's CRC, the provenance chunk's included
    svg = saved["svg"].read_bytes()
    assert b"<svg" in svg[:200] and svg.rstrip().endswith(b"</svg>")
    result = json.loads(saved["json"].read_text())
    assert result["format"] == "explorer-result/1" and names == {result["view"]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", result["created"])
    assert [r["name"] for r in result["requests"]] == [f"{result['view']}-{i}" for i in range(len(result["requests"]))]
    records = [r["provenance"] for r in result["requests"]]
    assert read_provenance(saved["png"]) == read_provenance(saved["svg"]) == records
    return result


def check_requests(server, result: dict, sent: list[tuple[str, dict]]) -> None:
    """A view's JSON export (`result`) lists the requests it `sent` (endpoint and body, "provenance"
    aside), in order: each with the API's answer to that request asked again (without "async" or
    "stream"; a job-only endpoint's job result),
    and the provenance of the answer the view got (this endpoint and body, the model it names or
    the server's default)."""
    default = server[1].get("/model").get_json()["name"]
    assert [(r["endpoint"], r["provenance"]["request"]) for r in result["requests"]] == [
        (path, {**body, "provenance": True}) for path, body in sent]
    for r in result["requests"]:
        assert r["request"] == {k: v for k, v in r["provenance"]["request"].items()
                                if k not in ("provenance", "async", "stream")}
        assert r["provenance"]["endpoint"] == r["endpoint"]
        assert r["provenance"]["model"]["name"] == r["request"].get("model", default)
        assert r["response"] == helpers.answer(server[1], r["endpoint"], r["request"])


def show_token(token: str, limit: int) -> str:
    """svg.js's showToken: visible spaces, newlines and tabs, long tokens cut with an ellipsis."""
    s = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    return s[: limit - 1] + "…" if len(s) > limit else s


def redraw(page, panel, action) -> None:
    """Run `action` (a control change) and wait until the view has drawn a new figure."""
    old = panel.locator("svg.figure").element_handle()
    action()
    page.wait_for_function("old => !old.isConnected", arg=old)
    panel.locator("svg.figure").wait_for()
    page.wait_for_function("[...document.querySelectorAll('.panel')].every(p => p.getAttribute('aria-busy') !== 'true')")


def test_logit_lens_grid(page, server):
    analyze(page, TEXT)
    panel = open_view(page, "lens")
    redraw(page, panel, lambda: page.select_option("#lens-mode", "grid"))
    answer = api(server, "/lens", {"text": TEXT, "top_k": 5})
    n_layers, n_pos = len(answer["top"]), len(answer["positions"])
    cells = panel.locator(".lens-grid-cell")
    assert cells.count() == n_layers * n_pos
    assert page.locator("#lens-k").is_hidden() and page.locator("#lens-shade").is_visible()
    # last layer on top: the first cell is the last layer at position 0, labelled with its top-1
    first = answer["top"][-1][0][0]
    assert cells.first.locator("text").text_content() == show_token(first["token"], 8)
    tip = hover_text(page, cells.first)
    assert f"layer {n_layers - 1}, after #0" in tip and f"top id {first['token_id']}" in tip
    assert all(json.dumps(t["token"], ensure_ascii=False) in tip for t in answer["top"][-1][0])  # top-5 on hover
    # shading follows the selector: entropy shades differ from probability shades
    fills = [cells.nth(i).locator("rect").get_attribute("fill") for i in range(n_pos)]
    redraw(page, panel, lambda: page.select_option("#lens-shade", "entropy"))
    assert "entropy" in panel.locator("svg.figure").text_content()
    assert [cells.nth(i).locator("rect").get_attribute("fill") for i in range(n_pos)] != fills
    redraw(page, panel, lambda: page.select_option("#lens-shade", "kl"))
    assert "KL(final ‖ layer)" in panel.locator("svg.figure").text_content()
    screenshot(page, "lens-grid")

    # a target: its probability and rank across layers at the selected position, crossover marked
    last = len(answer["tokens"]) - 1
    target = answer["final"][last][0]["token_id"]  # the model's own answer there: it crosses over
    with_target = api(server, "/lens", {"text": TEXT, "top_k": 5, "target": target})
    redraw(page, panel, lambda: (page.fill("#lens-target", str(target)), page.press("#lens-target", "Enter")))
    assert panel.locator("circle.target-rank").count() == n_layers
    assert panel.locator("circle.target-prob").count() == n_layers
    crossover = with_target["target"]["crossover_layer"][last]
    assert panel.locator(".crossover").text_content().startswith(f"crossover: layer {crossover}")
    ranks = [panel.locator("circle.target-rank").nth(l).locator("title").text_content() for l in range(n_layers)]
    assert ranks == [f"layer {l}: rank {with_target['target']['rank'][l][last]}" for l in range(n_layers)]
    screenshot(page, "lens-grid-target")
    # clicking a column selects that position for the chart, without a new request
    requests = []
    page.on("request", lambda r: r.url.endswith("/lens") and requests.append(r))
    redraw(page, panel, lambda: cells.nth(1).click())
    assert page.input_value("#lens-pos") == "1" and requests == []
    expected = with_target["target"]["crossover_layer"][1]
    assert panel.locator(".crossover").text_content().startswith(
        "never top-1" if expected is None else f"crossover: layer {expected}")


def test_surprisal_chips(page, server):
    analyze(page, TEXT)
    page.check("#surprisal")
    page.locator("#surprisal-legend").wait_for(state="visible")
    logprobs = api(server, "/score", {"texts": [TEXT]})["results"][0]["token_logprobs"]
    chips = page.locator("#chips .chip")
    assert chips.count() == len(logprobs)
    assert chips.nth(0).get_attribute("data-surprisal") is None  # BOS: nothing to be surprised by
    for i in range(1, len(logprobs)):
        assert f"surprisal {-logprobs[i]:.3f} nats" in chips.nth(i).get_attribute("title")
        assert chips.nth(i).evaluate("c => c.style.background") != ""
    top = max(-lp for lp in logprobs[1:])
    assert f"{top:.2f} nats" in page.locator("#surprisal-legend").inner_text()
    screenshot(page, "surprisal")
    page.uncheck("#surprisal")
    assert page.locator("#surprisal-legend").is_hidden()
    assert chips.nth(1).evaluate("c => c.style.background") == ""
    assert "surprisal" not in chips.nth(1).get_attribute("title")


def test_attribution(page, server):
    analyze(page, TEXT)
    panel = open_view(page, "dla")
    n_tokens = len(api(server, "/tokenize", {"text": TEXT})["tokens"])
    # no answer typed: the model's own top-1 at the last position
    top1 = api(server, "/predict", {"text": TEXT, "token_index": n_tokens - 1, "top_k": 1})
    answer = top1["predictions_by_layer"][-1]["top_tokens"][0]["token_id"]
    default = api(server, "/dla", {"text": TEXT, "answer": answer})
    assert json.dumps(default["answer"]["token"], ensure_ascii=False) in panel.locator("svg.figure").text_content()
    redraw(page, panel, lambda: (page.fill("#dla-answer", " mat"), page.press("#dla-answer", "Enter")))
    redraw(page, panel, lambda: (page.fill("#dla-distractor", " floor"), page.press("#dla-distractor", "Enter")))
    data = api(server, "/dla", {"text": TEXT, "answer": " mat", "distractor": " floor"})
    n_layers, n_heads = len(data["attn"]), len(data["heads"][0])
    assert panel.locator(".dla-bar").count() == 2 * n_layers + 3  # embed, attn and mlp per layer, bias, total
    assert panel.locator(".dla-head").count() == n_layers * n_heads
    tip = hover_text(page, panel.locator('.dla-head[data-layer="1"][data-head="2"]'))
    value = data["heads"][1][2]
    assert tip == f"layer 1, head 2: {'+' if value >= 0 else ''}{value:.4f}"
    tip = hover_text(page, panel.locator('.dla-bar[data-label="total"]'))
    assert tip.endswith(f"{data['total']:.4f}")
    assert f"= {data['total']:.4f}" in panel.locator("svg.figure").text_content()
    screenshot(page, "attribution")
    # another position refetches
    redraw(page, panel, lambda: page.select_option("#dla-pos", "3"))
    assert "after #3" in panel.locator("svg.figure").text_content()


@pytest.mark.parametrize("view, path, params, setup", [
    ("lens", "/lens", {"top_k": 5}, lambda page: page.select_option("#lens-mode", "grid")),
    ("dla", "/dla", {"answer": " mat", "distractor": " floor"},
     lambda page: (page.fill("#dla-answer", " mat"), page.fill("#dla-distractor", " floor"),
                   page.press("#dla-distractor", "Enter"))),
])
def test_exports_of_grid_and_attribution(page, server, view, path, params, setup):
    panel = open_view(page, view)
    redraw(page, panel, lambda: setup(page))
    exported = download_exports(page, panel, f"export-{view}-{path.strip('/')}")
    text = page.input_value("#text")
    if view == "dla":
        params["position"] = len(api(server, "/tokenize", {"text": text})["tokens"]) - 1
    check_requests(server, exported, [(path, {"text": text, **params})])


# --- Patching and causal tracing ------------------------------------------------------------------

FACT_BODY = {"text": FACT, "subject": "Eiffel Tower"}


def run_view(page, name: str) -> None:
    """Press a view's Run and wait until its job ended and the figure is drawn."""
    old = page.query_selector(f"#panel-{name} svg.figure")
    with page.expect_response(lambda r: r.request.method == "POST" and r.status == 202):
        page.click({"patching": "#patch-run", "tracing": "#trace-run"}[name])
    if old is not None:
        page.wait_for_function("old => !old.isConnected", arg=old)
    page.locator(f"#panel-{name} svg.figure").wait_for(timeout=60_000)
    page.wait_for_function(f"document.querySelector('#panel-{name}').getAttribute('aria-busy') === 'false'")


def test_patching_resid_and_heads(page, server):
    page.click("#tab-patching")
    tokens = api(server, "/tokenize", {"text": CLEAN})["tokens"]
    differ = [i for i, (a, b) in enumerate(zip(tokens, api(server, "/tokenize", {"text": CORRUPT})["tokens"]))
              if a["token_id"] != b["token_id"]]
    page.wait_for_function("document.querySelector('#patch-lengths').textContent.length > 0")
    assert page.locator("#patch-lengths").inner_text().startswith(
        f"{len(tokens)} tokens each; they differ at position {differ[0]}")
    assert page.locator("#patch-pair td.differs").count() == 2 * len(differ)
    assert "Press Run" in page.locator("#patch-status").inner_text()

    panel = page.locator("#panel-patching")
    polls = []
    page.on("request", lambda r: "/jobs/" in r.url and r.method == "GET" and polls.append(r.url))
    with page.expect_request("**/patch") as sent:
        run_view(page, "patching")  # resid_pre, denoise: the defaults
    assert sent.value.post_data_json == {**PAIR, "site": "resid_pre", "direction": "denoise", "async": True,
                                         "provenance": True}
    assert polls  # the bar is fed by GET /jobs/{id}
    data = api(server, "/patch", {**PAIR, "site": "resid_pre"})
    n_layers, seq = len(data["recovery"]), len(data["recovery"][0])
    assert panel.locator("rect.patch-cell").count() == n_layers * seq
    assert page.locator("#patch-progress").evaluate("p => p.value") == 1
    assert page.locator("#patch-status").inner_text() == f"done: {data['cells_computed']} cells run"
    cell = panel.locator(f'rect.patch-cell[data-row="{n_layers - 1}"][data-col="{seq - 1}"]')
    tip = hover_text(page, cell)
    assert tip.startswith(f"L{n_layers - 1} · #{seq - 1} {show_token(tokens[-1]['token_str'], 24)}")
    rec, metric = numbers(tip.split(": ", 1)[1])
    assert rec == pytest.approx(data["recovery"][-1][-1], rel=1e-3, abs=1e-6)
    assert metric == pytest.approx(data["effect"][-1][-1], rel=1e-3)
    # columns are the clean tokens; the differing positions are underlined
    assert panel.locator("line.differs").count() == len(differ)
    screenshot(page, "patching")

    page.select_option("#patch-site", "heads")
    page.select_option("#patch-direction", "noise")
    run_view(page, "patching")
    heads = api(server, "/patch", {**PAIR, "site": "heads", "direction": "noise"})
    n_heads = len(heads["effect"][0])
    assert panel.locator("rect.patch-cell").count() == n_layers * n_heads
    tip = hover_text(page, panel.locator('rect.patch-cell[data-row="1"][data-col="2"]'))
    assert tip.startswith("L1 H2: recovery")
    assert numbers(tip.split(": ", 1)[1])[0] == pytest.approx(heads["recovery"][1][2], rel=1e-3, abs=1e-6)

    page.select_option("#patch-site", "heads_by_position")
    run_view(page, "patching")
    by_pos = api(server, "/patch", {**PAIR, "site": "heads_by_position", "direction": "noise"})
    assert page.locator("#patch-position").is_visible()
    assert page.locator("#patch-position option").count() == seq
    position = int(page.input_value("#patch-position"))
    # the position shown first is the one where patching a head moves the metric most
    totals = [sum(abs(by_pos["recovery"][l][h][p]) for l in range(n_layers) for h in range(n_heads)) for p in range(seq)]
    assert position == totals.index(max(totals))
    assert panel.locator("rect.patch-cell").count() == n_layers * n_heads
    redraw(page, panel, lambda: page.select_option("#patch-position", str(differ[0])))
    tip = hover_text(page, panel.locator('rect.patch-cell[data-row="2"][data-col="1"]'))
    assert tip.startswith(f"L2 H1 at #{differ[0]}")
    assert numbers(tip.split(": ", 1)[1])[0] == pytest.approx(by_pos["recovery"][2][1][differ[0]], rel=1e-3, abs=1e-6)
    screenshot(page, "patching-heads-by-position")


def test_patching_unequal_lengths_explained_and_refused(page, server):
    page.click("#tab-patching")
    corrupt = "When Mary went to the store, Mary gave a drink to"
    page.fill("#patch-corrupt", corrupt)
    a = api(server, "/tokenize", {"text": CLEAN})["tokens"]
    b = api(server, "/tokenize", {"text": corrupt})["tokens"]
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x["token_id"] != y["token_id"])
    expected = f"clean has {len(a)} tokens, corrupt {len(b)}; first difference at position {first}"
    page.wait_for_function("t => document.querySelector('#patch-lengths').textContent.startsWith(t)", arg=expected)
    assert page.locator("#patch-pair tr").nth(2).locator("td").count() == len(a)  # the longer row sets the width
    # sent anyway: the server's 400 shows in the page
    message = server[1].post("/patch", json={**PAIR, "corrupt": corrupt, "site": "resid_pre"}).get_json()["error"]
    page.click("#patch-run")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == message and "same number of tokens" in message
    assert page.locator("#panel-patching svg.figure").count() == 0
    assert not page.locator("#patch-run").is_disabled()
    assert page.locator("#patch-status").inner_text() == "failed: see the error above"
    screenshot(page, "patching-error")


def test_causal_tracing_three_panels(page, server):
    page.click("#tab-tracing")
    page.fill("#trace-samples", "3")
    panel = page.locator("#panel-tracing")
    run_view(page, "tracing")
    answers = {kind: api(server, "/causal_trace", {**FACT_BODY, "kind": kind, "samples": 3}) for kind in ("resid", "mlp", "attn")}
    resid = answers["resid"]
    n_layers, seq = len(resid["scores"]), len(resid["tokens"])
    for kind in answers:
        assert panel.locator(f"rect.trace-{kind}").count() == n_layers * seq
        assert panel.locator(f"rect.trace-{kind}[data-subject]").count() == n_layers * len(resid["subject_positions"])
    assert panel.locator(".trace-title").count() == 3
    assert page.locator("#trace-progress").evaluate("p => p.value") == 1
    labels = [t for t in panel.locator("svg.figure text").all_text_contents() if t.startswith("*")]
    assert labels == ["*" + show_token(resid["tokens"][p], 14) for p in resid["subject_positions"]]
    p, l = resid["subject_positions"][-1], n_layers - 1
    tip = hover_text(page, panel.locator(f'rect.trace-mlp[data-row="{p}"][data-col="{l}"]'))
    mlp = answers["mlp"]
    assert tip.startswith(f"mlp · layer {l} (layers ") and "(subject)" in tip
    shown = float(re.search(r"\) = (\S+) \(clean", tip).group(1))
    assert shown == pytest.approx(mlp["scores"][l][p], rel=5e-3)
    screenshot(page, "tracing")


@pytest.mark.parametrize("view", ["patching", "tracing"])
def test_exports_of_causal_views(page, server, view):
    page.click(f"#tab-{view}")
    if view == "tracing":
        page.fill("#trace-samples", "2")
    run_view(page, view)
    exported = download_exports(page, page.locator(f"#panel-{view}"), f"export-{view}")
    if view == "patching":  # job results: the answers to "async" requests
        sent = [("/patch", {**PAIR, "site": "resid_pre", "direction": "denoise", "async": True})]
    else:
        sent = [("/causal_trace", {**FACT_BODY, "answer": None, "kind": k, "samples": 2, "async": True})
                for k in ("resid", "mlp", "attn")]
    check_requests(server, exported, sent)


def test_causal_tracing_error_is_shown(page, server):
    page.click("#tab-tracing")
    page.fill("#trace-subject", "Louvre")
    message = server[1].post("/causal_trace", json={**FACT_BODY, "subject": "Louvre"}).get_json()["error"]
    page.click("#trace-run")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == message
    assert page.locator("#panel-tracing svg.figure").count() == 0 and not page.locator("#trace-run").is_disabled()
    page.fill("#trace-subject", FACT_BODY["subject"])
    page.fill("#trace-samples", "1")
    run_view(page, "tracing")  # the next good run clears it
    assert error.is_hidden()


def model_fields(page, action) -> list:
    """The "model" field (None when absent) of every POST body `action` makes the page send; each
    body asks for its answer's provenance."""
    bodies: list = []
    page.on("request", lambda r: r.method == "POST" and bodies.append(json.loads(r.post_data or "{}")))
    action()
    page.wait_for_function("[...document.querySelectorAll('.panel, #tokens')].every(p => p.getAttribute('aria-busy') !== 'true')")
    assert all(b.get("provenance") is True for b in bodies), bodies
    return [b.get("model") for b in bodies]


def test_one_model_has_no_model_selector_or_compare(page):
    assert page.locator("#model-choice").is_hidden() and page.locator("#tab-compare").is_hidden()
    sent = model_fields(page, lambda: analyze(page, "One model only"))
    assert sent and set(sent) == {None}  # the original requests, without "model"
    page.focus("#tab-features")  # the last visible tab
    page.keyboard.press("ArrowRight")  # the hidden tab is skipped: wraps to the first
    assert page.get_attribute("#tab-trajectories", "aria-selected") == "true"


def test_model_selector_switches_the_views(two_page, two_server):
    page, client = two_page, two_server[1]
    assert page.locator("#model-choice").is_visible()
    assert page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)") == ["tiny-a", "tiny-b"]
    panel = open_view(page, "lens")
    first = panel.locator("svg.figure").text_content()
    sent = model_fields(page, lambda: page.select_option("#model-select", "tiny-b"))
    assert sent and set(sent) == {"tiny-b"}
    assert "tiny-b" in page.locator("#model").inner_text()
    panel.locator("svg.figure").wait_for()
    position = int(page.input_value("#lens-pos"))
    text = page.input_value("#text")
    want = api(two_server, "/predict", {"text": text, "token_index": position, "top_k": 5, "model": "tiny-b"})
    shown = panel.locator("svg.figure").text_content()
    top = want["predictions_by_layer"][-1]["top_tokens"][0]["token"]
    assert shown != first and show_token(top, 14).rstrip("…")[:6] in shown
    assert client.post("/predict", json={"text": text, "token_index": position, "model": "tiny-a"}).get_json() != want


def test_compare_two_models_side_by_side(two_page, two_server):
    page = two_page
    analyze(page, TEXT)
    panel = open_view(page, "compare")
    assert [t.text_content() for t in panel.locator(".compare-model").all()] == ["tiny-a", "tiny-b"]
    answers = {m: api(two_server, "/lens", {"text": TEXT, "top_k": 5, "model": m}) for m in ("tiny-a", "tiny-b")}
    n_layers, n_pos = len(answers["tiny-a"]["top"]), len(answers["tiny-a"]["positions"])
    cells = panel.locator(".lens-grid-cell")
    assert cells.count() == 2 * n_layers * n_pos
    # each column's first cell (last layer, position 0) is its own model's top-1 guess
    for column, model in enumerate(("tiny-a", "tiny-b")):
        label = cells.nth(column * n_layers * n_pos).locator("text").text_content()
        assert label == show_token(answers[model]["top"][-1][0][0]["token"], 8)
    assert answers["tiny-a"]["top"] != answers["tiny-b"]["top"]
    n = len(answers["tiny-a"]["tokens"])
    assert panel.locator("rect.cell").count() == 2 * n * n
    attn = {m: api(two_server, "/attention", {"text": TEXT, "layer": 1, "model": m}) for m in ("tiny-a", "tiny-b")}
    choose(page, panel, "#cmp-layer", "1")
    old = panel.locator("svg.figure").element_handle()
    panel.locator('.head-tile[data-head="2"]').last.click()  # a head tile picks the head of both
    page.wait_for_function("old => !old.isConnected && document.querySelector('#cmp-head').value === '2'", arg=old)
    right_cell = panel.locator("rect.cell").nth(n * n + n + 1)  # tiny-b, query 1, key 1
    assert hover_text(page, right_cell).endswith(f"{attn['tiny-b']['attention_matrix'][2][1][1]:.4f}")
    left_cell = panel.locator("rect.cell").nth(n + 1)
    assert hover_text(page, left_cell).endswith(f"{attn['tiny-a']['attention_matrix'][2][1][1]:.4f}")
    exported = download_exports(page, panel, "export-compare")
    assert exported["view"] == "compare-tiny-a-tiny-b-L1-H2"
    check_requests(two_server, exported, [
        request for m in ("tiny-a", "tiny-b") for request in (
            ("/lens", {"text": TEXT, "top_k": 5, "model": m}),
            ("/attention", {"text": TEXT, "layer": 1, "head": None, "model": m}))])
    choose(page, panel, "#cmp-b", "tiny-a")  # the same model twice: identical columns
    assert cells.nth(0).locator("text").text_content() == cells.nth(n_layers * n_pos).locator("text").text_content()
    screenshot(page, "compare")
    with page.expect_download() as download:
        panel.locator('[data-export="svg"]').click()
    assert download.value.suggested_filename == "compare-tiny-a-tiny-a-L1-H2.svg"


# --- generate ----------------------------------------------------------------------------------

def generate(page, max_new_tokens: int, **fields: str):
    """Open the Generate view, fill its controls (`fields`: input id -> value), press Generate
    and wait until the stream ended and the figure is drawn. The panel."""
    page.click("#tab-generate")
    page.fill("#gen-max", str(max_new_tokens))
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    page.click("#gen-run")
    page.wait_for_function("document.querySelector('#gen-status').textContent.includes('finish:')")
    page.wait_for_function("document.querySelector('#panel-generate').getAttribute('aria-busy') === 'false'")
    return page.locator("#panel-generate")


def shown_ids(panel, cls: str) -> list[int]:
    return [int(i) for i in panel.locator(f"g.{cls}").evaluate_all("gs => gs.map(g => g.dataset.tokenId)")]


def test_generate_streams_tokens(page, server):
    analyze(page, TEXT)
    page.click("#tab-generate")
    page.fill("#gen-max", "12")
    # The chip count of every figure drawn: one more chip each time a token streams in.
    page.evaluate("""() => { window.counts = []; new MutationObserver((records) => records.forEach((r) =>
        r.addedNodes.forEach((n) => window.counts.push(n.querySelectorAll('g.gen-token').length)))).observe(
        document.querySelector('#panel-generate .figure-box'), {childList: true}); }""")
    page.click("#gen-run")
    page.wait_for_function("document.querySelector('#gen-status').textContent.includes('finish:')")
    panel = page.locator("#panel-generate")
    answer = api(server, "/generate", {"prompt": TEXT, "max_new_tokens": 12})
    assert shown_ids(panel, "gen-token") == [t["token_id"] for t in answer["generated"]]  # greedy: the same
    assert shown_ids(panel, "prompt-token") == [t["token_id"] for t in answer["prompt"]]
    assert page.evaluate("window.counts")[:12] == list(range(1, 13))
    first = answer["generated"][0]
    tip = hover_text(page, panel.locator("g.gen-token").first)
    logprob, entropy = map(float, re.search(r"logprob (\S+), entropy (\S+) nats", tip).groups())
    assert json.dumps(first["token"]) in tip and json.dumps(first["alternatives"][1]["token"]) in tip
    assert logprob == pytest.approx(first["logprob"], rel=1e-3) and entropy == pytest.approx(first["entropy"], rel=1e-3)
    assert page.locator("#gen-status").inner_text() == "12 tokens, finish: length"
    screenshot(page, "generate")


def test_generate_cancel(page, server):
    analyze(page, "a")
    n = 64 - len(api(server, "/tokenize", {"text": "a"})["tokens"])  # the tiny model's whole context
    page.click("#tab-generate")
    page.fill("#gen-max", str(n))
    page.click("#gen-run")
    page.locator("#panel-generate g.gen-token").first.wait_for()
    page.click("#gen-cancel")
    page.wait_for_function("document.querySelector('#gen-status').textContent.startsWith('cancelled')")
    shown = page.locator("#panel-generate g.gen-token").count()
    assert 0 < shown < n and page.locator("#gen-status").inner_text() == f"cancelled after {shown} tokens"
    assert not page.locator("#gen-run").is_disabled() and page.locator("#gen-cancel").is_disabled()


def test_generate_error_is_shown(page, server):
    message = server[1].post("/generate", json={"prompt": TEXT, "max_new_tokens": 0}).get_json()["error"]
    page.click("#tab-generate")
    page.fill("#gen-max", "0")
    page.click("#gen-run")
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert error.inner_text() == message
    assert page.locator("#gen-status").inner_text() == "failed: see the error above"
    generate(page, 3)  # the next good run clears it
    assert error.is_hidden()


def test_generate_sampled_export(page, server):
    analyze(page, TEXT)
    page.click("#tab-generate")
    page.select_option("#gen-mode", "sample")
    panel = generate(page, 5, **{"gen-temperature": "0.8", "gen-seed": "3"})
    exported = download_exports(page, panel, "export-generate")
    body = {"prompt": TEXT, "max_new_tokens": 5, "do_sample": True, "temperature": 0.8, "seed": 3}
    check_requests(server, exported, [("/generate", {**body, "stream": True})])  # replayed: the same tokens
    assert shown_ids(panel, "gen-token") == [t["token_id"] for t in exported["requests"][0]["response"]["generated"]]


def test_generate_steered_with_compare(page, server):
    analyze(page, TEXT)
    page.click("#tab-generate")
    page.click("#gen-steer summary")
    page.select_option("#gen-layer", "1")
    panel = generate(page, 6, **{"gen-positive": "Love", "gen-negative": "Hate", "gen-coefficient": "50"})
    steer = [{"layer": 1, "vector": {"kind": "actadd", "positive": "Love", "negative": "Hate"}, "coefficient": 50}]
    answer = api(server, "/generate", {"prompt": TEXT, "max_new_tokens": 6, "steer": steer, "compare": True})
    assert shown_ids(panel, "gen-token") == [t["token_id"] for t in answer["generated"]]
    assert shown_ids(panel, "unsteered-token") == [t["token_id"] for t in answer["unsteered"]["generated"]]
    assert panel.locator("rect.kl-cell").count() == len(answer["kl"]) == 6
    assert numbers(hover_text(page, panel.locator("rect.kl-cell").last))[-1] == pytest.approx(answer["kl"][-1], rel=1e-3)
    assert "steered at L1" in panel.locator("svg.figure").text_content()
    screenshot(page, "generate-steered")


@pytest.fixture(scope="module")
def sae_server(tiny_model, tmp_path_factory):
    """The tiny model with a random SAE "demo" on block 1's residual input."""
    from model_utils import write_random_sae

    path = write_random_sae(tmp_path_factory.mktemp("viewer-sae"), d_in=64, d_sae=96, hook="blocks.1.hook_resid_pre",
                            scale=0.3)
    yield from serving(tiny_model, {"SAES": [f"name=demo,{path}"]})


@pytest.fixture()
def sae_page(browser, sae_server):
    yield from viewer_page(browser, sae_server)


def test_features_tab_colours_tokens_and_chooses_features(sae_page, sae_server):
    page = sae_page
    analyze(page, TEXT)
    listed = api(sae_server, "/features", {"text": TEXT, "sae": "demo", "top_k": 10})
    top = listed["tokens"][3]["features"][0]["index"]  # the most active feature of " sat"
    panel = open_view(page, "features")
    old = panel.locator("svg.figure").element_handle()
    page.fill("#feat-index", str(top))
    page.locator("#feat-index").blur()  # the input's own change event
    page.wait_for_function("old => !old.isConnected", arg=old)
    panel.locator("svg.figure").wait_for()
    feature = api(sae_server, "/feature", {"text": TEXT, "sae": "demo", "index": top})
    shown = [float(a) for a in panel.locator("g.feat-chip").evaluate_all("ns => ns.map(n => n.dataset.activation)")]
    assert shown == pytest.approx(feature["activations"], rel=1e-6)
    quality = panel.locator("text.feat-quality").text_content()
    assert f"{listed['reconstruction']['variance_explained'] * 100:.1f}% of variance explained" in quality
    assert feature["promotes"][0]["token"].replace(" ", "·")[:11] in panel.locator("svg.figure").text_content()
    tip = hover_text(page, panel.locator("g.feat-chip").nth(3))
    assert f"#{top} " in tip and f"L0 {listed['tokens'][3]['l0']}" in tip
    # A clicked token lists its top features; clicking one chooses it.
    panel.locator("g.feat-chip").nth(3).click()
    picks = page.locator("#feat-top button.feat-pick")
    assert picks.count() == len(listed["tokens"][3]["features"])
    second = listed["tokens"][3]["features"][1]["index"]
    old = panel.locator("svg.figure").element_handle()
    picks.nth(1).click()
    page.wait_for_function("old => !old.isConnected", arg=old)
    assert page.input_value("#feat-index") == str(second)
    assert f"Feature {second} of demo" in panel.locator("svg.figure").text_content()
    screenshot(page, "features")


def test_features_ablate_and_steer_buttons(sae_page, sae_server):
    page = sae_page
    analyze(page, TEXT)
    open_view(page, "features")
    page.fill("#feat-answer", " mat")
    page.click("#feat-ablate")
    page.wait_for_function("document.querySelector('#feat-result').textContent.includes('effect')")
    edit = api(sae_server, "/feature", {"text": TEXT, "sae": "demo", "index": 0, "answer": " mat",
                                        "edit": "ablate"})["edit"]
    assert numbers(page.locator("#feat-result").inner_text())[-1] == pytest.approx(edit["results"][0]["effect"],
                                                                                   rel=1e-3, abs=1e-6)
    page.fill("#feat-coefficient", "20")
    page.click("#feat-steer")
    page.wait_for_function("document.querySelector('#feat-result').textContent.includes('unsteered')")
    answer = api(sae_server, "/generate", {"prompt": TEXT, "max_new_tokens": 12, "compare": True, "steer": [
        {"vector": {"kind": "feature", "sae": "demo", "index": 0}, "coefficient": 20}]})
    assert json.dumps(answer["completion"]) in page.locator("#feat-result").inner_text()


def test_features_tab_without_an_sae_says_how_to_load_one(page):
    page.click("#tab-features")
    page.locator("#feat-none").wait_for(state="visible")
    assert "--sae" in page.locator("#feat-none").inner_text()
    assert page.locator("#panel-features svg.figure").count() == 0


def sent_bodies(page, path: str) -> list[dict]:
    """The JSON bodies the page sends to `path` from now on (a list that fills as it sends)."""
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith(path) and bodies.append(r.post_data_json))
    return bodies


def test_a_generated_token_selects_it_in_the_other_views(page, server):
    analyze(page, TEXT)
    panel = generate(page, 6)
    answer = api(server, "/generate", {"prompt": TEXT, "max_new_tokens": 6})
    ids = answer["token_ids"]
    assert panel.locator("g.prompt-token").first.text_content() == "BOS"  # as the page's own chips
    attention, predict = sent_bodies(page, "/attention"), sent_bodies(page, "/predict")
    position = answer["generated"][3]["position"]
    panel.locator(f'g.gen-token[data-position="{position}"]').click()
    page.wait_for_function("document.querySelector('#tokens').getAttribute('aria-busy') === 'false'")
    assert page.input_value("#text") == answer["text"]
    mode = page.locator("#ids-mode")
    assert mode.is_visible() and f"{len(ids)} tokens" in mode.inner_text() and f"#{position} " in mode.inner_text()
    assert page.locator("#chips .chip").count() == len(ids)
    assert panel.locator(f'g.gen-token[data-position="{position}"] rect').get_attribute("stroke")  # outlined
    screenshot(page, "generate-token-ids-mode")
    open_view(page, "attention")
    assert [(b["token_ids"], "text" in b) for b in attention] == [(ids, False)]
    lens = open_view(page, "lens")
    assert predict[-1]["token_ids"] == ids and predict[-1]["token_index"] == position and "text" not in predict[-1]
    shown = api(server, "/predict", {"token_ids": ids, "token_index": position, "top_k": 5})
    assert f"after #{position} " in lens.locator("svg.figure").text_content()
    assert lens.locator(".lens-cell").first.text_content().startswith(
        show_token(shown["predictions_by_layer"][0]["top_tokens"][0]["token"], 12))
    # Generate again: the sequence is continued as its ids
    generation = sent_bodies(page, "/generate")
    generate(page, 2)
    assert generation[-1]["prompt_ids"] == ids and "prompt" not in generation[-1]
    # editing the text leaves the mode at once; the next analysis tokenizes the text
    page.fill("#text", TEXT)
    assert mode.is_hidden()
    analyze(page, TEXT)
    open_view(page, "attention")
    assert attention[-1]["text"] == TEXT and "token_ids" not in attention[-1]


def test_a_token_selected_by_keyboard_and_the_mode_left_by_button(page, server):
    analyze(page, TEXT)
    panel = generate(page, 3)
    panel.locator("svg.figure").focus()
    page.keyboard.press("End")  # the last generated token
    page.keyboard.press("Enter")
    page.locator("#ids-mode").wait_for()
    last = len(api(server, "/tokenize", {"text": TEXT})["tokens"]) + 2
    assert f"#{last} " in page.locator("#ids-mode").inner_text() and page.input_value("#dla-pos") == str(last)
    text = page.input_value("#text")
    tokenized = sent_bodies(page, "/tokenize")
    page.click("#ids-mode-leave")
    page.wait_for_function("document.querySelector('#tokens').getAttribute('aria-busy') === 'false'")
    assert page.locator("#ids-mode").is_hidden() and tokenized == [{"text": text, "provenance": True}]


def test_changing_the_colour_mid_stream_keeps_the_figure(page, server, monkeypatch):
    step = generation.Decoder.step
    monkeypatch.setattr(generation.Decoder, "step", lambda self, forced=None: (time.sleep(0.1), step(self, forced))[1])
    analyze(page, TEXT)
    page.click("#tab-generate")
    page.fill("#gen-max", "30")
    page.click("#gen-run")
    box = page.locator("#panel-generate .figure-box")
    box.locator("g.gen-token").first.wait_for()
    page.evaluate("""() => { window.blanked = false; const box = document.querySelector('#panel-generate .figure-box');
        new MutationObserver(() => { if (!box.children.length) window.blanked = true; }).observe(box, {childList: true}); }""")
    page.select_option("#gen-colour", "entropy")
    assert "colour: entropy" in box.locator("svg.figure").text_content()  # redrawn at once, not at the next token
    assert page.locator("#gen-status").inner_text().startswith("generating")  # mid-stream indeed
    page.wait_for_function("document.querySelector('#gen-status').textContent.includes('finish:')")
    assert not page.evaluate("window.blanked")
    assert box.locator("g.gen-token").count() == 30 and "colour: entropy" in box.locator("svg.figure").text_content()


@pytest.mark.parametrize("kind, fields, vector", [
    ("mean_diff", {"gen-positive": "Love\nJoy", "gen-negative": "Hate"},
     {"kind": "mean_diff", "positive": ["Love", "Joy"], "negative": ["Hate"]}),
    ("values", {"gen-values": ", ".join(["0.5", "-1"] * 32)}, {"kind": "values", "values": [0.5, -1] * 32}),
])
def test_generate_steered_by_mean_difference_or_values(page, server, kind, fields, vector):
    analyze(page, TEXT)
    page.click("#tab-generate")
    page.click("#gen-steer summary")
    page.select_option("#gen-layer", "1")
    page.select_option("#gen-kind", kind)
    page.select_option("#gen-positions", "generated")
    page.check("#gen-unit")
    sent = sent_bodies(page, "/generate")
    panel = generate(page, 5, **fields, **{"gen-coefficient": "40"})
    steer = [{"layer": 1, "vector": vector, "coefficient": 40, "positions": "generated", "unit": True}]
    assert sent[0]["steer"] == steer and sent[0]["compare"] is True
    answer = api(server, "/generate", {"prompt": TEXT, "max_new_tokens": 5, "steer": steer, "compare": True})
    assert shown_ids(panel, "gen-token") == [t["token_id"] for t in answer["generated"]]
    assert shown_ids(panel, "unsteered-token") == [t["token_id"] for t in answer["unsteered"]["generated"]]
    assert f"({kind} × 40)" in panel.locator("svg.figure").text_content()


def test_generate_top_k_top_p_and_stop_strings(page, server):
    analyze(page, TEXT)
    full = api(server, "/generate", {"prompt": TEXT, "max_new_tokens": 8, "do_sample": True, "seed": 2, "top_k": 20,
                                     "top_p": 0.9})
    stop = full["generated"][4]["token"]
    page.click("#tab-generate")
    page.select_option("#gen-mode", "sample")
    sent = sent_bodies(page, "/generate")
    panel = generate(page, 8, **{"gen-seed": "2", "gen-top-k": "20", "gen-top-p": "0.9",
                                 "gen-stop": f"zzz|{stop}|a\\nb"})
    assert sent[0]["stop"] == ["zzz", stop, "a\nb"] and (sent[0]["top_k"], sent[0]["top_p"]) == (20, 0.9)
    answer = api(server, "/generate", {k: v for k, v in sent[0].items() if k not in ("stream", "provenance")})
    assert answer["finish_reason"] == "stop" and len(answer["generated"]) <= 5
    assert shown_ids(panel, "gen-token") == [t["token_id"] for t in answer["generated"]]
    assert page.locator("#gen-status").inner_text().endswith("finish: stop")


# --- the Jacobian lens on the Logit lens tab: the Fit button (texts in, progress, cancel), the Lens
# switch, the grid saying which lens drew it, and a target's probability through both lenses ----

@pytest.fixture(scope="module")
def jlens_server(tiny_model, tmp_path_factory):
    """The app on a copy of the tiny model with no lens yet, saving fitted lenses to a temporary directory."""
    yield from serving(dataclasses.replace(tiny_model, lenses={}), {"JLENS_DIR": str(tmp_path_factory.mktemp("jlens"))})


@pytest.fixture()
def jlens_page(browser, jlens_server):
    yield from viewer_page(browser, jlens_server)


def test_jlens_fit_then_read_both_lenses(jlens_page, jlens_server):
    page, server = jlens_page, jlens_server
    client = server[1]
    page.fill("#text", FACT)
    page.press("#text", "Enter")
    panel = open_view(page, "lens")
    assert page.locator("#lens-kind option").all_inner_texts() == ["logit"]
    page.fill("#jlens-texts", "\n".join(CORPUS))
    page.fill("#jlens-name", "viewer-lens")
    with page.expect_response("**/jobs/jlens_fit") as started:
        page.click("#jlens-run")
    job = started.value.json()["job"]
    page.wait_for_function("document.querySelector('#jlens-status').textContent.startsWith('done')", timeout=60_000)
    result = ok(client.get(f"/jobs/{job}"))["result"]
    assert page.locator("#jlens-status").inner_text() == (
        f"done: lens viewer-lens fitted on {len(CORPUS)} texts, saved at {result['path']}")
    assert page.locator("#jlens-progress").evaluate("p => p.value") == 1
    # the new lens is chosen and the view redrawn through it: rows as the API reads them
    page.wait_for_function("document.querySelector('#lens-kind').value === 'jacobian:viewer-lens'")
    panel.locator("svg.figure .lens-title").wait_for()
    page.wait_for_function("document.querySelector('#panel-lens .lens-title').textContent.startsWith('Jacobian')")
    position = int(page.input_value("#lens-pos"))
    answer = ok(client.post("/predict", json={"text": FACT, "token_index": position, "top_k": 5,
                                              "lens": "jacobian", "jlens": "viewer-lens"}))
    top = answer["predictions_by_layer"][0]["top_tokens"][0]
    assert f"id {top['token_id']}" in hover_text(page, panel.locator(".lens-row").first.locator(".lens-cell").first)
    # the grid with a target: the Jacobian curve and the logit lens's on one chart
    redraw(page, panel, lambda: page.select_option("#lens-mode", "grid"))
    assert panel.locator(".lens-title").text_content().startswith("Jacobian lens viewer-lens:")
    redraw(page, panel, lambda: (page.fill("#lens-target", " Paris"), page.press("#lens-target", "Enter")))
    body = {"text": FACT, "top_k": 5, "target": " Paris"}
    jacobian = ok(client.post("/lens", json={**body, "lens": "jacobian", "jlens": "viewer-lens"}))["target"]
    logit = ok(client.post("/lens", json=body))["target"]
    k = position  # a short text: the grid reads every position
    n_layers = len(jacobian["probability"])
    def curve(cls: str) -> list[float]:
        return [float(panel.locator(f"circle.{cls}").nth(l).locator("title").text_content().split("= ")[1])
                for l in range(n_layers)]
    assert curve("target-prob") == [jacobian["probability"][l][k] for l in range(n_layers)]
    assert curve("logit-prob") == [logit["probability"][l][k] for l in range(n_layers)]
    screenshot(page, "jlens-grid-target")
    # back to the logit lens: one curve, the original title
    redraw(page, panel, lambda: page.select_option("#lens-kind", "logit"))
    assert panel.locator(".lens-title").text_content().startswith("Logit lens:")
    assert panel.locator("circle.logit-prob").count() == 0


def test_jlens_fit_cancel(jlens_page, jlens_server):
    page, server = jlens_page, jlens_server
    open_view(page, "lens")
    page.fill("#jlens-texts", "\n".join(CORPUS * 20))  # seconds of fitting, within the job bound
    page.fill("#jlens-name", "never")
    page.click("#jlens-run")
    page.wait_for_function("!document.querySelector('#jlens-cancel').disabled")
    page.click("#jlens-cancel")
    page.wait_for_function("document.querySelector('#jlens-status').textContent === 'cancelled'", timeout=60_000)
    assert not page.locator("#jlens-run").is_disabled()
    assert "never" not in [lens["name"] for lens in ok(server[1].get("/model"))["lenses"]]


def test_a_lens_saved_earlier_is_offered_and_loads_when_chosen(browser, tiny_model, jlens_server):
    """A server started later on the same lens directory offers the saved lens (not loaded yet);
    choosing it draws the grid through it, as the API reads it."""
    client = jlens_server[1]
    started = client.post("/jobs/jlens_fit", json={"texts": CORPUS, "name": "earlier"})
    assert helpers.wait_job(client, started.get_json()["job"], timeout=300)["status"] == "done"
    later = serving(dataclasses.replace(tiny_model, lenses={}), {"JLENS_DIR": client.application.config["JLENS_DIR"]})
    for url, later_client in later:
        for page in viewer_page(browser, (url, later_client)):
            analyze(page, FACT)
            panel = open_view(page, "lens")
            page.wait_for_function("[...document.querySelectorAll('#lens-kind option')].some("
                                   "o => o.textContent === 'Jacobian: earlier (saved)')")
            redraw(page, panel, lambda: page.select_option("#lens-kind", "jacobian:earlier"))
            assert panel.locator(".lens-title").text_content().startswith("Jacobian lens earlier")
            assert [lens["name"] for lens in ok(later_client.get("/model"))["lenses"]] == ["earlier"]
            position = int(page.input_value("#lens-pos"))
            answer = ok(client.post("/predict", json={"text": FACT, "token_index": position, "top_k": 5,
                                                      "lens": "jacobian", "jlens": "earlier"}))
            top = answer["predictions_by_layer"][0]["top_tokens"][0]
            assert f"id {top['token_id']}" in hover_text(page, panel.locator(".lens-row").first.locator(".lens-cell").first)


@pytest.fixture(scope="module")
def two_jlens_server(tiny_model, other_model, tmp_path_factory):
    """Two tiny models, each with a Jacobian lens fitted here (copies: the session's models keep none)."""
    models = {"tiny-a": dataclasses.replace(tiny_model, lenses={}), "tiny-b": dataclasses.replace(other_model, lenses={})}
    for url, client in serving(models, {"JLENS_DIR": str(tmp_path_factory.mktemp("jlens-two"))}):
        for model in models:
            started = client.post("/jobs/jlens_fit", json={"texts": CORPUS, "name": f"lens-{model}", "model": model})
            assert started.status_code == 202, started.get_json()
            assert helpers.wait_job(client, started.get_json()["job"], timeout=300)["status"] == "done"
        yield url, client


def test_compare_two_models_through_their_jacobian_lenses(browser, two_jlens_server):
    for page in viewer_page(browser, two_jlens_server):
        analyze(page, TEXT)
        panel = open_view(page, "compare")
        choose(page, panel, "#cmp-lens", "jacobian")
        cells = panel.locator(".lens-grid-cell")
        for column, model in enumerate(("tiny-a", "tiny-b")):
            jacobian = api(two_jlens_server, "/lens", {"text": TEXT, "top_k": 5, "model": model, "lens": "jacobian"})
            logit = api(two_jlens_server, "/lens", {"text": TEXT, "top_k": 5, "model": model})
            n_layers, n_pos = len(jacobian["top"]), len(jacobian["positions"])
            assert jacobian["top"][0] != logit["top"][0]  # the lens changes what layer 0 reads
            label = cells.nth(column * n_layers * n_pos + (n_layers - 1) * n_pos).locator("text").text_content()
            assert label == show_token(jacobian["top"][0][0][0]["token"], 8)  # first layer, position 0
        assert panel.locator(".lens-title").first.text_content().startswith("Jacobian")
