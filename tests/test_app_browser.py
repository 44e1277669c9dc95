"""End to end in headless Chromium (Debian's chromium and chromium-driver, driven by selenium): open the page,
click Generate, watch the live preview, check the faces appear, save a screenshot; then start a long
generation and check that Cancel stops the sampling loop. On the "Edit a photo" tab: upload a face through
the file input, paint a stroke on the canvas, click Edit, and check the edited faces appear after the photo.

The test writes its screenshot to pytest's tmp_path. The README's picture comes from the same code:

    python tests/test_app_browser.py docs/app.png
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow          # a real Chromium against a real server: `make test-fast` leaves it out

from ddpm_faces.pipeline import DEFAULT_STRENGTH

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


def missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium chromium-driver)"
    if not Path(DRIVER).is_file() and not shutil.which("chromedriver"):
        return f"{DRIVER} is missing (Debian: apt-get install chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int = 1):
    """The page of `ddpm-faces serve` with the bundled model only (no runs/), on a free localhost port:
    (app, demo)."""
    from ddpm_faces.app import FaceApp, build_page, launch

    with tempfile.TemporaryDirectory() as no_runs:
        app = FaceApp.from_paths(None, runs_dir=no_runs, threads=threads)
    demo = build_page(app)
    launch(demo, port=free_port(), block=False, quiet=True)
    return app, demo


def open_browser(width: int = 1400, height: int = 1100):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(arg)
    driver_path = DRIVER if Path(DRIVER).is_file() else shutil.which("chromedriver")
    return webdriver.Chrome(service=Service(driver_path), options=options)


def click_generate_and_capture(driver, url: str, screenshot: Path, timeout: float = 120.0) -> dict:
    """Open the page, click Generate, wait for the faces; returns what was seen and writes a full-page PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    previews, end = set(), time.monotonic() + timeout
    status = ""
    while time.monotonic() < end:
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        if status.startswith("Denoising") and driver.find_elements(By.CSS_SELECTOR, "#preview img"):
            previews.add(status)                             # a live picture of the estimates is on the page
        if " faces in " in status:
            break
        time.sleep(0.1)
    loaded = wait_for_loaded_images(driver, "#faces img", 4)
    captions = [img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#faces img")]
    time.sleep(0.5)                                          # let the strip and the file box settle
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": int(height), "deviceScaleFactor": 1, "mobile": False})
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return {"status": status, "previews": sorted(previews), "captions": captions, "loaded": loaded}


def wait_for_loaded_images(driver, selector: str, expected: int, timeout: float = 20.0) -> int:
    """How many images under `selector` have arrived (decoded, naturalWidth > 0), waiting up to `timeout` s for
    `expected` of them: the gallery fills after the status line says done, later on a loaded machine."""
    script = f"return Array.from(document.querySelectorAll('{selector}')).filter(i => i.naturalWidth > 0).length"
    deadline, loaded = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        loaded = driver.execute_script(script)
        if loaded >= expected:
            break
        time.sleep(0.1)
    return loaded


def start_long_generation_and_cancel(driver, app, timeout: float = 30.0) -> list[str]:
    """Ask for 1000 steps, click Cancel once it is denoising; returns the status lines seen after the click,
    until the status has settled (the same text for a second)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    steps = driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys("1000", Keys.TAB)
    time.sleep(0.3)
    done = len(app.runs)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    end = time.monotonic() + timeout
    while not driver.find_element(By.CSS_SELECTOR, "#status").text.startswith("Denoising"):
        assert time.monotonic() < end, "the long generation did not start"
        time.sleep(0.05)
    driver.find_element(By.CSS_SELECTOR, "#cancel").click()
    while app.active or len(app.runs) == done:
        assert time.monotonic() < end, "Cancel did not stop the sampling loop"
        time.sleep(0.05)
    seen, settled = [], time.monotonic()
    while time.monotonic() - settled < 1.0 and time.monotonic() < end + 10:
        status = driver.find_element(By.CSS_SELECTOR, "#status").text
        if not seen or status != seen[-1]:
            seen.append(status)
            settled = time.monotonic()
        time.sleep(0.05)
    return seen


def open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == name)
    tab.click()


def upload_photo(driver, photo: Path, timeout: float = 60.0) -> None:
    """Send `photo` to the Edit tab's file input, then wait until the painting canvas holds it (the canvas's
    hint to pick a tool is gone, nothing is processing and its zoom level has settled)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#edit-photo input[type=file]").send_keys(str(photo))
    end, seen, since = time.monotonic() + timeout, None, time.monotonic()
    while time.monotonic() < end:
        text = driver.find_element(By.CSS_SELECTOR, "#edit-canvas").text
        busy = "processing" in text or "select the draw tool" in text
        if text != seen or busy:
            seen, since = text, time.monotonic()
        elif time.monotonic() - since > 0.75:
            return
        time.sleep(0.05)
    raise AssertionError(f"the canvas did not take the photo: {seen!r}")


def paint_stroke(driver) -> None:
    """Drag the brush across the middle of the canvas (the photo's upper middle)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = max(driver.find_elements(By.CSS_SELECTOR, "#edit-canvas canvas"),
                 key=lambda c: c.size["width"] * c.size["height"])
    ActionChains(driver).move_to_element_with_offset(canvas, -40, -30).click_and_hold().move_by_offset(80, 0) \
        .move_by_offset(0, 20).move_by_offset(-80, 0).release().perform()


def set_checkbox(driver, label: str, on: bool) -> None:
    from selenium.webdriver.common.by import By

    box = next(lab for lab in driver.find_elements(By.CSS_SELECTOR, "label") if label in lab.text)
    if box.find_element(By.CSS_SELECTOR, "input[type=checkbox]").is_selected() != on:
        box.click()


def edit_a_photo(driver, url: str, photo: Path, timeout: float = 120.0) -> dict:
    """Open the page's Edit tab, upload `photo`, take its centre square (the drawn faces are no faces to the
    detector), paint a stroke, click Edit and wait for the edits; returns what was seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"))
    open_tab(driver, "Edit a photo")
    upload_photo(driver, photo)
    set_checkbox(driver, "Find the face", False)
    paint_stroke(driver)
    driver.find_element(By.CSS_SELECTOR, "#edit").click()
    end, status = time.monotonic() + timeout, ""
    while time.monotonic() < end:
        status = driver.find_element(By.CSS_SELECTOR, "#edit-status").text
        if " of the photo in " in status or driver.find_elements(By.CSS_SELECTOR, ".toast-body"):
            break
        time.sleep(0.1)
    loaded = wait_for_loaded_images(driver, "#edits img", 5)
    captions = [img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#edits img")]
    return {"status": status, "captions": captions, "loaded": loaded,
            "errors": [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body")],
            "files": "".join(driver.find_element(By.CSS_SELECTOR, "#edit-files").text.split()),
            "command": driver.find_element(By.CSS_SELECTOR, "#edit-command").text}


@pytest.mark.skipif(missing() is not None, reason=f"no headless browser: {missing()}")
def test_clicking_generate_shows_faces_and_cancel_stops(tmp_path):
    from PIL import Image

    app, demo = start_server()
    driver = open_browser()
    try:
        seen = click_generate_and_capture(driver, demo.local_url, tmp_path / "app.png")
        assert " faces in " in seen["status"], seen
        assert seen["captions"] == [f"seed 0 · image {i}" for i in range(4)]
        assert seen["loaded"] == 4                             # the images really arrived in the page
        assert seen["previews"], "no live preview was shown while it denoised"
        shot = Image.open(tmp_path / "app.png")
        assert shot.width == 1400 and shot.height > 600
        statuses = start_long_generation_and_cancel(driver, app)
        assert app.runs[-1].outcome == "cancelled" and app.runs[-1].steps_done < 1000
        assert statuses[-1] == "Stopped." and not any("Error" in s for s in statuses), statuses
    finally:
        driver.quit()
        demo.close()


@pytest.mark.skipif(missing() is not None, reason=f"no headless browser: {missing()}")
def test_uploading_a_photo_and_clicking_edit_shows_the_edits(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import draw_face

    photo = tmp_path / "face.png"
    Image.fromarray(draw_face(np.random.default_rng(1), 96)).save(photo)
    app, demo = start_server()
    driver = open_browser()
    try:
        seen = edit_a_photo(driver, demo.local_url, photo)
    finally:
        driver.quit()
        demo.close()
        app.close()
    assert seen["status"].startswith("4 edits of the photo in "), seen
    assert "inpainting the painted region" in seen["status"], seen          # the stroke reached the server
    assert seen["captions"] == ["photo (framed)"] + [f"seed 0 · edit {i}" for i in range(4)], seen
    assert seen["loaded"] == 5 and not seen["errors"], seen
    assert "edited-seed0.png" in seen["files"] and "mask.png" in seen["files"], seen
    assert f"ddpm-faces edit --image face.png --strength {DEFAULT_STRENGTH:g} --mask mask.png --no-detect" in seen["command"], seen
    assert app.runs[-1].kind == "edit" and app.runs[-1].outcome == "done"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start the app with the bundled model, click Generate in "
                                                 "headless Chromium and save a screenshot.")
    parser.add_argument("out", nargs="?", default="docs/app.png", help="PNG to write (default docs/app.png)")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    app, demo = start_server()
    driver = open_browser()
    try:
        seen = click_generate_and_capture(driver, demo.local_url, Path(args.out))
    finally:
        driver.quit()
        demo.close()
    print(f"{seen['status']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
