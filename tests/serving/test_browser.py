"""The web page in a real browser: Debian's headless chromium driven by Selenium and chromium-driver.

Serves the bundled model and gate with uvicorn on a free local port, uploads a real X-ray of
../shared/data/cxr (class, bars, rule and heatmap appear) and a colour photo (no diagnosis, no bars).
Skips when chromium, chromium-driver, selenium or the real data are absent (`.ci/run` installs them).
Set CXRSCREEN_SCREENSHOT=docs/screenshots/page.png to also write the README's screenshot (the
prediction of the real X-ray with the image itself hidden).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=900,1200"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The app with the bundled model and gate, served by uvicorn on 127.0.0.1 in a thread."""
    import uvicorn

    from cxrscreen.gate.model import gate_for_run
    from cxrscreen.predict.predictor import load_model
    from cxrscreen.serving import create_app

    run = load_model(None)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(run, gate=gate_for_run(run)), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Debian chromium with a fresh profile (skips when it or its driver is missing)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    for exe in (CHROMIUM, CHROMEDRIVER):
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            pytest.skip(f"{exe} not found (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _real_xray(data_dir: Path) -> Path:
    """A fixed real X-ray of the gate's evaluation half that the bundled gate accepts."""
    from cxrscreen.gate.model import gate_for_run
    from cxrscreen.io.xray import read_xray
    from cxrscreen.predict.predictor import load_model
    from tests.gate.test_gate import _eval_half_sample

    gate = gate_for_run(load_model(None))
    for p in _eval_half_sample(data_dir, per_source=3):
        if not gate.flags(read_xray(p)):
            return p
    pytest.fail("no accepted real X-ray in the sample")


def _upload(driver: Any, url: str, path: Path, timeout: float = 60) -> None:
    """Open the page, choose `path`, press Analyse and wait for the result or an error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#target option[value]"))
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "go").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "result").is_displayed() or "Error" in d.find_element(By.ID, "status").text)
    WebDriverWait(driver, timeout).until(ec.element_to_be_clickable((By.ID, "go")))


def test_real_xray_shows_class_bars_rule_and_heatmap(server: str, browser: Any, data_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    xray = _real_xray(data_dir)
    _upload(browser, server, xray)
    assert browser.find_element(By.ID, "status").text == ""
    label = browser.find_element(By.ID, "label").text
    assert label.startswith("Predicted: ") and label.split(": ")[1] in ("covid", "normal", "pneumonia"), label
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert [b.find_element(By.TAG_NAME, "span").text for b in bars] == ["covid", "normal", "pneumonia"]
    widths = [float(b.find_element(By.CSS_SELECTOR, ".fill").get_attribute("style").split("width:")[1]
                    .split("%")[0]) for b in bars]
    assert abs(sum(widths) - 100) < 0.5, widths
    assert browser.find_element(By.ID, "rule").text.startswith("How the class is chosen")
    img = browser.find_element(By.ID, "heatmap")
    assert img.is_displayed()
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
    caption = browser.find_element(By.ID, "caption")
    assert caption.is_displayed() and "where the model looked" in caption.text
    # the caption lies below the image, not over it
    assert caption.location["y"] >= img.location["y"] + img.size["height"] - 1
    shot = os.environ.get("CXRSCREEN_SCREENSHOT")
    if shot:  # the README's screenshot: the page with the prediction, the X-ray itself hidden
        from PIL import Image

        browser.execute_script("document.getElementById('figure').hidden = true;")
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(shot)
        footer = browser.find_element(By.ID, "model")
        bottom = int(footer.location["y"] + footer.size["height"] + 16)
        with Image.open(shot) as full:
            cropped = full.crop((0, 0, full.width, min(full.height, bottom)))
        cropped.save(shot, optimize=True)


def test_photo_gets_no_diagnosis(server: str, browser: Any, tmp_path: Path, data_dir: Path) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By
    from skimage import data

    photo = tmp_path / "holiday.jpg"
    Image.fromarray(data.coffee()).save(photo, quality=90)
    _upload(browser, server, photo)
    assert browser.find_element(By.ID, "label").text == "No diagnosis"
    flags = browser.find_element(By.ID, "flags").text
    assert flags.startswith("No diagnosis is given for this image") and "colour picture" in flags, flags
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .bar") == []
    assert "%" not in browser.find_element(By.ID, "result").text.replace(flags, "")
    assert not browser.find_element(By.ID, "figure").is_displayed()
    for word in ("Predicted", "covid", "pneumonia"):
        assert word not in browser.find_element(By.ID, "result").text
