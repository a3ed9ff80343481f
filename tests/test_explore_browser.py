"""The explorer in a real browser: Playwright driving Debian's headless Chromium.

Skipped, with the reason, only where Playwright or a Chromium executable is missing
(``.ci/run`` installs both: ``apt-get install chromium`` and the ``explore`` extra).
Screenshots go to ``test-artifacts/`` (or ``$PATCHSAE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the explorer needs the explore extra (fastapi, uvicorn)")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="browser tests need playwright: pip install 'patchsae[explore]'"
)

from explore_server import running  # noqa: E402
from patchsae.explore.core import open_model  # noqa: E402
from patchsae.explore.explorer import Explorer  # noqa: E402
from tiny_atlas import build_atlas  # noqa: E402

CHROMIUM = (
    os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
)
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PATCHSAE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium executable: apt-get install chromium (or set CHROMIUM=PATH)",
    ),
]


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    tiny = build_atlas(tmp_path_factory.mktemp("browser"))
    return Explorer([open_model(tiny["atlas"])])


@pytest.fixture(scope="module")
def page(explorer):
    with running(explorer) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.set_default_timeout(30_000)
        page.base_url = url
        yield page
        browser.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"explorer-{name}.png"), full_page=True)


def upload_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(7)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, size=(90, 160, 3), dtype=np.uint8)).save(path)
    return path


def loaded(page, selector: str) -> bool:
    return page.eval_on_selector_all(
        selector, "els => els.length > 0 && els.every(e => e.complete && e.naturalWidth > 0)"
    )


def test_upload_click_switch_and_toggle(page, explorer, tmp_path):
    page.goto(page.base_url + "/")
    page.wait_for_selector("#examples img")
    page.set_input_files("#file", str(upload_file(tmp_path)))
    page.wait_for_selector("#image-top li")
    session = page.evaluate("() => document.getElementById('photo').src.length") > 0
    assert session
    # click the centre of patch (row 1, col 2) of the grid drawn over the (CSS-scaled) image
    box = page.locator("#overlay").bounding_box()
    answer = explorer.encode((tmp_path / "wide.png").read_bytes())
    left, top, right, bottom = answer["box"]
    fx, fy = left + (right - left) * 2.5 / 4, top + (bottom - top) * 1.5 / 4
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
    page.wait_for_function("document.getElementById('patch-label').textContent.includes('row')")
    assert page.text_content("#patch-label") == "patch row 1, column 2"
    expected = explorer.click(answer["session"], fx, fy)["top"]["base"]
    shown = page.eval_on_selector_all("#patch-top li", "els => els.map(e => +e.dataset.latent)")
    assert shown == [e["latent"] for e in expected]
    assert page.locator("#plot .trace-patch line").count() > 0
    # open the first latent of the patch: mask on the upload and reference thumbnails render
    first = expected[0]["latent"]
    page.click(f"#patch-top li[data-latent='{first}']")
    page.wait_for_function(f"document.getElementById('latent-id').textContent === '#{first}'")
    page.wait_for_function("[...document.querySelectorAll('#latent-masks img')].length > 0")
    page.wait_for_function(
        "[...document.querySelectorAll('#refs img, #latent-masks img')]"
        ".every(e => e.complete && e.naturalWidth > 0)"
    )
    assert loaded(page, "#latent-masks img") and loaded(page, "#refs img.ref")
    assert all("mask=heat" in s for s in page.eval_on_selector_all("#refs img.ref", _srcs))
    shot(page, "latent")
    # toggle masks off: the references switch to plain thumbnails
    page.uncheck("#masks-toggle")
    page.wait_for_function(
        "[...document.querySelectorAll('#refs img.ref')]"
        ".every(e => !e.src.includes('mask=') && e.complete && e.naturalWidth > 0)"
    )
    assert loaded(page, "#refs img.ref")
    # switch latent: the panel follows
    second = expected[1]["latent"]
    page.click(f"#patch-top li[data-latent='{second}']")
    page.wait_for_function(f"document.getElementById('latent-id').textContent === '#{second}'")
    assert page.get_attribute("#latent-link", "href") == f"/?latent={second}"
    shot(page, "switched")


_srcs = "els => els.map(e => e.src)"


def test_bad_upload_shows_an_error_and_the_page_keeps_working(page, tmp_path):
    page.goto(page.base_url + "/")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    assert "cannot use this upload" in page.text_content("#error")
    shot(page, "bad-upload")
    page.click("#examples img")
    page.wait_for_selector("#image-top li")
    assert page.is_hidden("#error")


def test_link_search_and_browse(page):
    page.goto(page.base_url + "/?latent=3")
    page.wait_for_function("document.getElementById('latent-id').textContent === '#3'")
    page.fill("#search", "5")
    page.click("#search-go")
    page.wait_for_function("document.getElementById('latent-id').textContent === '#5'")
    page.fill("#search", "999")
    page.click("#search-go")
    page.wait_for_selector("#error:not([hidden])")
    assert "outside 0..63" in page.text_content("#error")
    page.click("#browse-dense")
    page.wait_for_selector("#browse-list li")
    page.click("#browse-list li")
    first = page.get_attribute("#browse-list li", "data-latent")
    page.wait_for_function(f"document.getElementById('latent-id').textContent === '#{first}'")
    page.click("#browse-low-entropy")
    page.wait_for_function("document.getElementById('browse-title').textContent.includes('low')")
    shot(page, "browse")


def test_image_decodes_in_the_browser(page, explorer):
    """The display copy is a real PNG of the uploaded pixels."""
    rgb = Image.new("RGB", (64, 40), (200, 30, 30))
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    answer = explorer.encode(buffer.getvalue())
    page.goto(page.base_url + "/")
    size = page.evaluate(
        """async (src) => { const im = new Image(); im.src = src; await im.decode();
        return [im.naturalWidth, im.naturalHeight]; }""",
        answer["image"],
    )
    assert size == [64, 40]
