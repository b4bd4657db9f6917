"""The page at GET / in a real browser: Debian's Chromium, headless, driven through chromedriver."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_server import png_bytes, running_server, save_tiny_model

from bigtransfer.serving.options import ServeOptions

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BAR_RGB = (0x1F, 0x6F, 0xEB)  # #bars .bar in page.css
WINDOW = (1000, 800)

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them for CI)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit chromedriver: Selenium never looks for (or downloads) one of its own.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_person_picks_an_image_and_sees_the_top_5_as_bars_with_the_latency(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_model(tmp_path, classes=["cat", "dog", "fox", "owl", "eel", "bee", "<b>ant</b>"])
    picture = tmp_path / "photo.png"
    picture.write_bytes(png_bytes(7, size=(64, 48)))
    with running_server(ServeOptions(str(model))) as (url, _):
        expected = httpx.post(f"{url}/predict?top_k=5", files=[("image", ("photo.png", picture.read_bytes(),
                                                                          "image/png"))]).json()
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "model.safetensors" in d.find_element(By.ID, "model").text)
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(picture))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars li")) == 5)

        rows = browser.find_elements(By.CSS_SELECTOR, "#bars li")
        labels = [row.find_element(By.CLASS_NAME, "label").text for row in rows]
        assert labels == [p["label"] for p in expected["results"][0]["predictions"]]
        widths = [row.find_element(By.CLASS_NAME, "bar").size["width"] for row in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1] >= 2
        latency = browser.find_element(By.ID, "latency").text
        assert re.fullmatch(r"latency \d+ ms \(server [\d.]+ ms\) · softmax", latency), latency
        assert browser.find_element(By.ID, "error").is_displayed() is False

        shot = tmp_path / "page.png"
        browser.save_screenshot(str(shot))
        widest = rows[0].find_element(By.CLASS_NAME, "bar").rect
        viewport = browser.execute_script("return [innerWidth * devicePixelRatio, innerHeight * devicePixelRatio]")
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert [image.shape[1], image.shape[0]] == viewport and image.shape[1] == WINDOW[0]
    top, left = int(widest["y"]), int(widest["x"])
    region = image[top + 2: top + int(widest["height"]) - 2, left + 3: left + int(widest["width"]) - 3]
    assert region.size, widest
    is_bar = (np.abs(region.astype(int) - BAR_RGB) <= 8).all(axis=2)
    assert is_bar.mean() > 0.95, f"only {is_bar.mean():.0%} of the widest bar has the bar colour"
    elsewhere = (np.abs(image.astype(int) - BAR_RGB) <= 8).all(axis=2).sum()
    assert elsewhere >= sum(widths) * 10  # five bars ~22 px high, each as wide as its probability


def test_the_page_shows_the_server_error_line_for_a_file_that_is_not_an_image(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_model(tmp_path)
    junk = tmp_path / "notes.png"
    junk.write_text("this is text with an image's name")
    with running_server(ServeOptions(str(model))) as (url, _):
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "model.safetensors" in d.find_element(By.ID, "model").text)
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(junk))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert browser.find_element(By.ID, "error").text == "notes.png: not a readable image (or a truncated one)"
        assert not browser.find_element(By.ID, "result").is_displayed()


def test_dropping_an_image_on_the_page_classifies_it_too(browser, tmp_path):
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = save_tiny_model(tmp_path)
    encoded = base64.b64encode(png_bytes(9)).decode()
    with running_server(ServeOptions(str(model))) as (url, _):
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "model.safetensors" in d.find_element(By.ID, "model").text)
        # What a person's drag and drop delivers: a drop event whose dataTransfer holds the file.
        browser.execute_script("""
            const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const dropped = new DataTransfer();
            dropped.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
        """, encoded)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#bars li")) == 5)
        assert browser.find_element(By.ID, "latency").text.startswith("latency ")
