"""The Logit lens tab's Jacobian lens in real headless Chromium (as tests/test_viewer.py): the Fit
button (texts in, progress, cancel), the Lens switch, the grid saying which lens drew it, and a
target's probability through both lenses on one chart, each checked against the API's answer."""
from __future__ import annotations

import dataclasses

import pytest
from werkzeug.serving import make_server

from app import create_app
from tests.helpers import FACT, ok, running
from tests.test_jlens import CORPUS
from tests.test_viewer import browser, hover_text, open_view, redraw, screenshot, viewer_page  # noqa: F401

pytestmark = pytest.mark.slow  # a real browser


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """The app on a copy of the tiny model with no lens yet, saving fitted lenses to a temporary directory."""
    app = create_app({"JLENS_DIR": str(tmp_path_factory.mktemp("jlens"))},
                     model=dataclasses.replace(tiny_model, lenses={}))
    with running(make_server("127.0.0.1", 0, app, threaded=True)) as httpd:
        yield f"http://127.0.0.1:{httpd.server_port}", app.test_client()


@pytest.fixture()
def page(browser, server):  # noqa: F811
    yield from viewer_page(browser, server)


def test_fit_a_lens_then_read_both_lenses(page, server):
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


def test_fit_cancel(page, server):
    open_view(page, "lens")
    page.fill("#jlens-texts", "\n".join(CORPUS * 20))  # seconds of fitting, within the job bound
    page.fill("#jlens-name", "never")
    page.click("#jlens-run")
    page.wait_for_function("!document.querySelector('#jlens-cancel').disabled")
    page.click("#jlens-cancel")
    page.wait_for_function("document.querySelector('#jlens-status').textContent === 'cancelled'", timeout=60_000)
    assert not page.locator("#jlens-run").is_disabled()
    assert "never" not in [lens["name"] for lens in ok(server[1].get("/model"))["lenses"]]
