"""/play starts each model from frames of the world it was trained on (issue 19 item 6): `maskgit` (the stochastic
world's model) opens on a frame of that world, with its two blue balls, and keeps stepping; `tiny` beside it on a
frame of the plain world, with none. Headless Chromium (/usr/bin/chromium) against a real `serve` of both models."""

from __future__ import annotations

import numpy as np
import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import E2E_AUTH, E2E_KEY, ROOT, start_server
from tests.e2e.test_play import CHROMIUM, STARTS, canvas_pixels, first_start
from worldserve.lab.fidelity import balls

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_worlds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("worlds")
    repo = tmp / "models"
    repo.mkdir()
    for name in ("tiny", "maskgit"):
        (repo / name).symlink_to(ROOT / "models" / name)
    srv = start_server(tmp, "--model-repo", str(repo), "--max-slots", "8", "--max-queue", "8", env=E2E_AUTH)
    yield srv
    srv.stop()


def test_each_model_starts_from_its_own_world(two_worlds):
    from PIL import Image

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(two_worlds.http + f"/play?model=maskgit#key={E2E_KEY}")
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
            assert page.get_attribute("#starts", "data-world") == "dynamic"
            start = np.asarray(Image.open(STARTS / first_start("maskgit")).convert("RGB"))
            shown = canvas_pixels(page)
            np.testing.assert_array_equal(shown, start)  # the stochastic world's frame, as written by lab/starts.py
            assert balls(shown).sum() == 2, "the stochastic world's start frame shows its two balls"
            page.keyboard.press("ArrowLeft")  # the model steps from it (a turn: the balls walk)
            page.wait_for_function("document.getElementById('screen').dataset.step === '0'", timeout=60_000)

            page.select_option("#model", "tiny")  # the plain world's model: its own frames, no balls
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
            assert page.get_attribute("#starts", "data-world") == "minigrid"
            shown = canvas_pixels(page)
            assert balls(shown).sum() == 0
            np.testing.assert_array_equal(shown, np.asarray(Image.open(STARTS / first_start("tiny")).convert("RGB")))
            assert not errors, errors
        finally:
            browser.close()
