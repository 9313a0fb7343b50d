"""The Gradio Space on the demo model: in headless Chromium, a demo test mention with its sentence and uploaded image
gets its gold entity first (a screenshot is saved); bad requests become an error the app shows."""

import importlib.util
import os
import shutil
import socket

import pytest
from conftest import ROOT

gr = pytest.importorskip("gradio", reason="the Space needs gradio (pip install -e '.[app]')")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "hub_card" / "space" / "screenshot.png"


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("m3el_space_app", ROOT / "hub_card" / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def linker(hub_folder):
    from transformers import pipeline

    return pipeline("multimodal-entity-linking", model=str(hub_folder), trust_remote_code=True, device="cpu")


def test_bad_requests_are_errors_the_app_shows(app, linker, tmp_path):
    link = app.make_link(linker)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    for sentence, mention, image, message in [
        ("the Atlas near the water", "", None, "'mention' is empty"),
        ("", "Atlas", None, "'text' is empty"),
        ("the Atlas near the water", "Atlas", str(broken), "unreadable image"),
    ]:
        with pytest.raises(gr.Error, match=message):
            link(sentence, mention, image, 5)
    html = link("the Atlas near the water", "Atlas", None, 3)
    assert html.count('class="m3el-entity"') == 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} not found: apt-get install -y chromium (Debian's package; no browser download)")
def test_in_chromium_a_demo_mention_gets_its_entity_first(app, linker, hub_folder, test_mentions, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright").sync_playwright
    # A demo test mention with an image that the model links right (the UI must show what the pipeline computes).
    mention = next(m for m in test_mentions
                   if m["image"] and linker({k: m[k] for k in ("mention", "text", "image")}, top_k=1)[0]["id"] ==
                   m["answer"])
    demo = app.build_demo(str(hub_folder), device="cpu")
    port = _free_port()
    demo.launch(css=app.CSS, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle", timeout=60_000)
                page.locator("#sentence textarea").fill(mention["text"])
                page.locator("#mention textarea, #mention input").first.fill(mention["mention"])
                page.locator("#image input[type=file]").set_input_files(mention["image"])
                page.locator("#image img").first.wait_for(timeout=30_000)  # the upload is shown
                page.locator("#link").click()
                first = page.locator("#results .m3el-entity").first
                first.wait_for(timeout=60_000)
                assert first.get_attribute("data-entity-id") == mention["answer"]
                assert first.get_attribute("data-rank") == "1"
                assert page.locator("#results .m3el-entity").count() == 5
                assert page.locator("#results .m3el-entity img").count() >= 1  # entity thumbnails are shown
                shot = tmp_path / "space.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("M3EL_UPDATE_SCREENSHOT") == "1":  # refresh the one the Space's README shows, on request only
        shutil.copyfile(shot, SCREENSHOT)
