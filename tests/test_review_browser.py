"""The review page in a real headless Chromium (Debian's, driven by Playwright): load, filter,
open a sample, toggle the mask, reject one, reload and see it, export; hostile text stays text.

Set ``APPLIANCE_SCREENSHOTS=DIR`` to keep the page's screenshots (docs/ holds two of them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from _review import HOSTILE_CATEGORY, ReviewServer
from conftest import require_module

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE_REASON = "<img src=x onerror=\"window.pwned=1\"> scratches & 'seams'"


@pytest.fixture(scope="module")
def page(review_workspace):
    sync_api = require_module("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing ({CHROMIUM}); .ci/run installs Debian's chromium",
                    pytrace=False)
    server = ReviewServer(review_workspace / "dataset", "--export-to",
                          str(review_workspace / "exports"))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # bypass_csp: Playwright's waits evaluate strings, which the page's CSP forbids. It also
        # makes the hostile-text test stricter: markup our script made would run despite CSP.
        context = browser.new_context(viewport={"width": 1400, "height": 900}, bypass_csp=True)
        tab = context.new_page()
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(server.url)
        tab.server, tab.dialogs, tab.errors = server, dialogs, errors
        yield tab
        browser.close()
    server.stop()


def _settled(page) -> None:
    """Wait until the grid shows the answer to the newest filters."""
    page.wait_for_selector("#grid[aria-busy=false]")


def _shot(page, name: str) -> None:
    folder = os.environ.get("APPLIANCE_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name))


def test_the_grid_loads_and_filters(page):
    assert "token=" not in page.url  # the server moved the token into a cookie
    _settled(page)
    total = page.locator(".card").count()
    assert total >= 14  # 13 samples + the judge's rejections, on one page
    assert page.locator(".card.episode").count() >= 1
    page.select_option("select[name=category]", "magnetic_tile")
    _settled(page)
    assert page.locator(".card").count() == 10
    page.select_option("select[name=category]", "")
    page.select_option("select[name=verdict]", "rejected")
    _settled(page)
    assert page.locator(".card").count() == page.locator(".card.episode").count() >= 1
    assert page.locator(".card .reason-line").first.inner_text()
    page.select_option("select[name=verdict]", "accepted")
    page.select_option("select[name=sort]", "score")
    _settled(page)
    assert page.locator(".card.episode").count() == 0
    _shot(page, "review-grid.png")
    assert page.locator("#counts").inner_text().endswith("to review")


def test_a_sample_opens_with_mask_zoom_and_trajectory(page):
    page.locator(".card.sample").first.click()
    page.wait_for_selector("#detail:not([hidden])")
    page.wait_for_function("document.getElementById('img-defect').naturalWidth > 0")
    # Fitted to the viewer once the picture's size is known (a 256 px photo in a ~400 px pane).
    page.wait_for_function("(z => z > 50 && z < 400)(parseInt("
                           "document.getElementById('zoom-level').textContent))")
    assert page.locator("#prompt").inner_text()
    assert page.locator("#steps li").count() >= 4
    layer = page.locator("#mask-layer")
    assert layer.is_visible()
    page.keyboard.press("m")
    assert not layer.is_visible()
    page.keyboard.press("m")
    assert layer.is_visible()
    page.fill("#mask-opacity", "80")
    assert page.evaluate("getComputedStyle(document.getElementById('mask-layer')).opacity") == "0.8"
    page.click("#zoom-full")
    assert page.locator("#zoom-level").inner_text() == "100 %"
    page.keyboard.press("+")
    assert page.locator("#zoom-level").inner_text() == "150 %"
    page.keyboard.press("0")
    _shot(page, "review-detail.png")


def test_reject_with_a_hostile_reason_then_reload(page):
    title = page.locator("#detail-title").inner_text()
    item_id = title.rsplit("· ", 1)[1]
    page.fill("#reason-text", HOSTILE_REASON)
    page.click("#reject")
    page.wait_for_function(f"!document.getElementById('detail-title').textContent.endsWith('{item_id}')")
    page.reload()
    _settled(page)
    page.select_option("select[name=review]", "rejected")
    _settled(page)
    assert page.locator(".card").count() == 1
    page.locator(".card").first.click()
    page.wait_for_selector("#detail:not([hidden])")
    decision = page.locator("#decision").inner_text()
    assert decision.startswith("rejected by night-shift") and HOSTILE_REASON in decision
    assert page.evaluate("window.pwned") is None and not page.dialogs and not page.errors
    assert page.locator("#history img").count() == 0  # the reason was not turned into markup
    page.keyboard.press("Escape")


def test_bulk_approve_and_export(page, review_workspace):
    page.select_option("select[name=review]", "unreviewed")
    page.select_option("select[name=category]", HOSTILE_CATEGORY)
    page.select_option("select[name=verdict]", "accepted")
    _settled(page)
    wanted = page.locator(".card.sample").count()
    assert wanted >= 1 and page.locator(".card").count() == wanted
    page.click("#select-page")
    page.click("#bulk-approve")
    page.wait_for_function("document.querySelectorAll('.card').length === 0")
    assert f"{wanted} approved" in page.locator("#counts").inner_text()
    page.click("#export")
    page.wait_for_function("document.getElementById('toast').textContent.startsWith('exported')")
    [export] = (review_workspace / "exports").iterdir()
    records = [json.loads(line) for line in (export / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == wanted and {r["category"] for r in records} == {HOSTILE_CATEGORY}
    feedback = (export / "review_feedback.jsonl").read_text()
    assert json.loads(feedback.splitlines()[0])["human_review"]["reason"] == HOSTILE_REASON
    assert not page.errors
