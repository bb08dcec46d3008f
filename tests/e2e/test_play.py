"""The /play page in headless Chromium (Debian's /usr/bin/chromium driven by Python Playwright): it loads, starts
a WebSocket session from a real start frame, a key press draws the model's next frame, frames/s is shown.
A screenshot is left at tests/artifacts/play-<mode>.png."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
STARTS = ROOT / "service" / "api" / "static" / "starts"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
READ_CANVAS = "document.getElementById('screen').toDataURL('image/png')"


def canvas_pixels(page) -> np.ndarray:
    url = page.evaluate(READ_CANVAS)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def first_start(model: str) -> str:
    """The start frame /play opens `model` from: the first of its world's (index.json, lab/starts.py)."""
    index = json.loads((STARTS / "index.json").read_text())
    return index["worlds"][index["models"].get(model, index["default"])][0]["file"]


def test_play_page_runs_a_session_from_a_real_start_frame(server, request):
    first = first_start("tiny")
    start = np.asarray(Image.open(STARTS / first).convert("RGB"))
    # what the model answers to "turn left" from that frame (greedy, so the page must draw exactly this)
    with server.rest().session("tiny", [start]) as s:
        want_left = s.step(0).frame
        want_forward = s.step(2).frame

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.http + "/play?model=tiny" + (f"#key={server.key}" if server.key else ""))
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
            np.testing.assert_array_equal(canvas_pixels(page), start)  # the real start frame is shown

            page.keyboard.press("ArrowLeft")
            page.wait_for_function("document.getElementById('screen').dataset.step === '0'", timeout=60_000)
            after = canvas_pixels(page)
            assert not np.array_equal(after, start), "a key press did not change the frame"
            np.testing.assert_array_equal(after, want_left)
            page.keyboard.press("w")
            page.wait_for_function("document.getElementById('screen').dataset.step === '1'", timeout=60_000)
            np.testing.assert_array_equal(canvas_pixels(page), want_forward)

            page.check("#auto")  # sustained play: frames/s becomes a positive number
            page.wait_for_function("Number(document.getElementById('step').textContent) >= 20", timeout=60_000)
            page.wait_for_function("Number(document.getElementById('fps').textContent) > 0", timeout=10_000)
            fps = float(page.inner_text("#fps"))
            page.uncheck("#auto")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"play-{request.node.callspec.params.get('server', 'server')}.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 0
            assert page.inner_text("#status") == "ready"
            assert not errors, errors
            print(f"/play: {fps:.1f} frames/s, screenshot {shot}")
        finally:
            browser.close()
