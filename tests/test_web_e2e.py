"""The web page in headless Chromium (Debian's package, driven by Playwright) against a real `a2n serve`."""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

SET5_BABY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmark" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytest.importorskip("fastapi", reason="a2n serve needs the serve extra: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[test]'")
import uvicorn  # noqa: E402

import a2n  # noqa: E402
from a2n.model import A2N  # noqa: E402
from a2n.server import create_app  # noqa: E402
from a2n.weights import save_weights  # noqa: E402


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`a2n serve`'s app with a seeded random x4 model, under uvicorn on a free loopback port; yields (url, weights)."""
    torch.manual_seed(0)
    weights = tmp_path / "w_x4.safetensors"
    save_weights(A2N(4), weights)
    server = uvicorn.Server(uvicorn.Config(create_app({4: weights}, shipped=False), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", weights
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[sync_api.Page]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: Debian's chromium package is not installed (.ci/run installs it; "
                    "apt-get install chromium), so the browser test cannot run")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path / "profile", executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            accept_downloads=True, viewport={"width": 1100, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        context.close()
        assert errors == [], f"JavaScript errors on the page: {errors}"


def test_upload_compare_zoom_and_download_in_chromium(server: tuple[str, Path], page: sync_api.Page, tmp_path: Path) -> None:
    if not SET5_BABY.exists():
        pytest.skip(f"{SET5_BABY} is absent: this test needs the project's shared data (../shared)")
    url, weights = server
    page.goto(url)
    page.wait_for_selector("#server-info:has-text('Ready to upscale ×4')")
    assert page.is_disabled("input[name=scale][value='2']") and page.is_checked("input[name=scale][value='4']")

    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "choose"
    page.set_input_files("#file", str(SET5_BABY))
    page.wait_for_selector(".job.done", timeout=60_000)
    assert "128×128 → 512×512" in page.inner_text(".job.done .status")

    assert page.is_visible("#viewer")
    sizes = page.evaluate("""['before', 'after'].map((id) => {
        const img = document.getElementById(id), box = img.getBoundingClientRect();
        return [img.naturalWidth, img.naturalHeight, Math.round(box.width), Math.round(box.height)];
    })""")
    (bw, bh, before_w, before_h), (aw, ah, after_w, after_h) = sizes
    assert (bw, bh, aw, ah) == (128, 128, 512, 512)
    assert (before_w, before_h) == (after_w, after_h) and after_w > 300

    page.focus("#divider")
    for _ in range(10):
        page.keyboard.press("ArrowLeft")
    assert page.input_value("#divider") == "40"
    assert page.eval_on_selector("#before", "e => e.style.clipPath") == "inset(0px 60% 0px 0px)"

    page.focus("#viewport")
    page.keyboard.press("+")
    assert page.inner_text("#zoom-value") == "2×"
    assert abs(page.eval_on_selector("#stage", "e => e.offsetWidth") - 2 * after_w) <= 1
    page.keyboard.press("0")
    assert page.eval_on_selector("#stage", "e => e.offsetWidth") == after_w

    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "babyx4_x4.png"
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    lr = Image.open(SET5_BABY)
    result = Image.open(saved)
    assert result.size == (4 * lr.width, 4 * lr.height)
    reference = np.asarray(a2n.upscale(lr, a2n.load_model(4, weights=weights)))
    assert np.abs(np.asarray(result).astype(int) - reference).max() <= 1


def test_dropped_files_are_upscaled_and_api_errors_are_shown(server: tuple[str, Path], page: sync_api.Page) -> None:
    url, _ = server
    page.goto(url)
    page.wait_for_selector("#server-info:has-text('Ready')")
    png = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(png, format="PNG")
    page.evaluate("""(bytes) => {
        const files = new DataTransfer();
        files.items.add(new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
    }""", list(png.getvalue()))
    page.wait_for_selector(".job.done")
    assert "16×12 → 64×48" in page.inner_text(".job.done .status")

    page.set_input_files("#file", [{"name": "notes.png", "mimeType": "image/png", "buffer": b"just some text"}])
    page.wait_for_selector(".job.failed")
    alert = page.inner_text("[role=alert]")
    assert alert.startswith("notes.png: not an image")
    assert "(HTTP 415)" in alert
    assert page.inner_text(".job.failed .status") in alert
