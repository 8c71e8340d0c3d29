"""The web page at / in a real headless Chromium (Debian's package, driven by Playwright for Python)."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from dicom_files import dicom_bytes
from PIL import Image
from serve_process import ServerProcess
from shipped import SHIPPED_VERSION

from pneumoscan.browser import find_chromium
from pneumoscan.checkpoint import default_model_path, load_checkpoint

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (apt-get install chromium)")]


@pytest.fixture(scope="module")
def server(tmp_path_factory, train_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("page")).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=find_chromium() or shutil.which("chromium"), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def uploads(tmp_path, fullres_dir, real_jpeg):
    xray = sorted((fullres_dir / "PNEUMONIA").iterdir())[0]
    dcm = tmp_path / "chest.dcm"
    dcm.write_bytes(dicom_bytes(tmp_path, np.asarray(Image.open(real_jpeg).convert("L")), ViewPosition="AP"))
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a radiograph\n")
    return xray, dcm, text


def test_upload_shows_results_heatmap_toggle_and_refusal(server, browser, uploads, fullres_dir):
    xray, dcm, text = uploads
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect = sync_api.expect
    expect(page.locator(".notice")).to_contain_text("Not a diagnostic device")
    expect(page.locator("#model-line")).to_contain_text(SHIPPED_VERSION)

    adult = next((fullres_dir.parents[0] / "dev_shift" / "adult_frontal").glob("adult_frontal_mhh_1.*"))
    page.set_input_files("#files", [str(xray), str(dcm), str(text), str(adult)])
    cards = page.locator(".card")
    expect(cards).to_have_count(4)
    expect(page.locator(".card[data-state=pending]")).to_have_count(0, timeout=60_000)

    jpeg = cards.filter(has_text=xray.name)
    expect(jpeg).to_have_attribute("data-state", "done")
    expect(jpeg.locator(".verdict")).to_have_text(re.compile(r"^(PNEUMONIA suspected|NORMAL: no pneumonia found)$"))
    badge = jpeg.locator(".badge")
    expect(badge).to_have_text(re.compile(r"^Risk (LOW|MEDIUM|HIGH)$"))
    level = badge.inner_text().split()[-1]
    expect(badge).to_have_class(re.compile(rf"\b{level}\b"))
    threshold = load_checkpoint(default_model_path())["threshold"]  # the page shows the served model's own
    expect(jpeg.locator(".probability")).to_have_text(
        re.compile(rf"^[01]\.\d{{3}} \(threshold {re.escape(f'{threshold:.3f}')}\)$"))
    expect(jpeg.locator(".uncertainty")).to_have_text(re.compile(r"^[01]\.\d{3}$"))
    expect(jpeg.locator(".probability-label")).to_have_text("P(pneumonia), calibrated")
    assert "not validated" in badge.get_attribute("title")  # HIGH is also forced by a view or population warning

    picture, toggle = jpeg.locator(".picture"), jpeg.locator(".heatmap-toggle")
    expect(toggle).to_be_checked()
    assert picture.get_attribute("src").startswith("data:image/png;base64,")
    toggle.uncheck()
    expect(picture).to_have_attribute("src", re.compile(r"^blob:"))  # the original
    expect(jpeg.locator(".caption")).to_have_text("original")
    toggle.check()
    expect(picture).to_have_attribute("src", re.compile(r"^data:image/png"))
    box = picture.bounding_box()
    assert box["width"] > 200 and box["height"] > 100

    dicom = cards.filter(has_text="chest.dcm")
    expect(dicom).to_have_attribute("data-state", "done")
    assert dicom.locator(".picture").get_attribute("src").startswith("data:image/png")
    dicom.locator(".heatmap-toggle").uncheck()
    expect(dicom.locator(".caption")).to_have_text("no preview for this format")

    refused = cards.filter(has_text="notes.jpg")
    expect(refused).to_have_attribute("data-state", "refused")
    expect(refused.locator(".reason")).to_have_text(
        "Could not read this file as an image. (not a recognised image (expected JPEG, PNG or DICOM))")
    expect(refused.locator(".numbers")).to_be_hidden()
    expect(refused.locator(".badge")).to_be_hidden()
    # an adult's frontal film: the plain words must not contradict the reason ("not a frontal chest X-ray")
    grown = cards.filter(has_text=adult.name)
    expect(grown).to_have_attribute("data-state", "refused")
    expect(grown.locator(".reason")).to_contain_text("outside what the model is validated for")
    expect(grown.locator(".reason")).to_contain_text("outside the validated population")
    assert "does not look like a frontal" not in grown.locator(".reason").inner_text()

    assert not errors, errors
    outside = [u for u in requested if not u.startswith((server.url, "data:", "blob:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"


def test_phone_width(server, browser, uploads):
    xray, _, _ = uploads
    page = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    page.goto(server.url + "/")
    page.set_input_files("#files", [str(xray)])
    card = page.locator(".card")
    sync_api.expect(card).to_have_attribute("data-state", "done", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, "the page scrolls sideways"
    for selector in (".notice", "#drop", ".card", ".card .picture"):
        box = page.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, selector
