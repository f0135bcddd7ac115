"""End to end: the real server on a loopback port, Debian's headless Chromium driven by Playwright, a real face.

Skips (with the reason) when /usr/bin/chromium or the playwright package is missing; CI installs both. The
screenshots are written to build/screenshots/ (server-page.png at desktop width, server-page-phone.png at 390 px).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import PAIRS, REPO, pair_ids
from server_helpers import FAST, live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "build" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install -y chromium)")
    pytest.importorskip("fastapi")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_page_protects_a_real_face_end_to_end(browser, shared_data):
    from faceshield.server.app import ServerSettings, create_app

    photo = PAIRS / "train" / f"{pair_ids(1)[0]}.png"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    app = create_app(ServerSettings())
    external = []
    with live_server(app) as base:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("request", lambda r: r.url.startswith(("http://", "https://")) and not r.url.startswith(base)
                and external.append(r.url))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(base + "/")
        page.locator("#method option").nth(1).wait_for(state="attached")  # the methods came from the API
        # keyboard: the photo picker and the main button are reachable with Tab
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "photos"
        page.set_input_files("#photos", str(photo))
        page.click("summary")  # advanced settings: tiny settings keep the test to seconds
        page.fill("#settings", "\n".join(FAST))
        page.click("#protect")
        card = page.locator(".card").first
        card.locator(".verdict").filter(has_text=":").wait_for(timeout=240_000)
        # (no wait_for_function: the page's CSP forbids the eval it uses, as it should)
        card.locator(".after img[src^='blob:']").wait_for(timeout=60_000)
        deadline = time.monotonic() + 30
        while not page.evaluate("document.querySelector('.card .after img').naturalWidth") and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        status = card.get_attribute("data-status")
        verdict = card.locator(".verdict").inner_text()
        assert status in ("protected", "weak"), verdict
        assert verdict.startswith(("protected", "weak: model")), verdict
        assert page.evaluate("document.querySelector('.card .before img').naturalWidth") == 256
        assert card.locator(".before .box").count() >= 1 and card.locator(".after .box").count() >= 1
        assert card.locator(".bar-row").count() == 1  # one model (mobilefacenet-ms1m), one face
        assert "mobilefacenet-ms1m" in card.locator(".bars").inner_text()
        assert card.locator("progress").get_attribute("value") == "100"
        assert card.locator("a[download]").get_attribute("download").endswith("_protected.png")
        assert page.locator("#zip").is_enabled()
        assert "Finished: " in page.locator("#status").inner_text()
        page.screenshot(path=str(SCREENSHOTS / "server-page.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
        page.screenshot(path=str(SCREENSHOTS / "server-page-phone.png"), full_page=True)
        # the page deletes the job once it has the results: nothing stays on the server
        deadline = time.monotonic() + 10
        while app.state.manager.jobs and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not app.state.manager.jobs
        # an unsupported file gets a clear message
        page.set_input_files("#photos", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"not a photo"}])
        page.click("#protect")
        page.locator("#status.error").filter(has_text="unsupported file type").wait_for(timeout=30_000)
        page.close()
    assert not errors, errors
    assert not external, external  # no CDN, no fonts, no network beyond this server
