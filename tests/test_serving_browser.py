"""The page at / in a real headless browser: choose an image, see score, verdict and heatmap overlay.

Uses Debian's `chromium` + `chromium-driver` through Selenium (no browser download); skipped with the
reason when they are not installed (`apt-get install -y chromium chromium-driver`).
"""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="Debian chromium + chromium-driver not installed "
                              "(apt-get install -y chromium chromium-driver)"),
]


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_scores_an_uploaded_image(serve_app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    name = next(n for n in serve_app.images if n.endswith(".png"))
    browser.get(serve_app.url)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    wait.until(lambda d: "threshold" in d.find_element(By.ID, "model").text)  # model info loaded
    browser.find_element(By.ID, "file").send_keys(str(serve_app.image_dir / name))
    wait.until(lambda d: d.find_element(By.ID, "verdict").text != "")
    expected = serve_app.expected_scores[name]
    assert float(browser.find_element(By.ID, "score").text) == pytest.approx(expected, abs=6e-6)  # 5 decimals
    assert browser.find_element(By.ID, "verdict").text == ("ANOMALOUS" if expected >= serve_app.threshold
                                                           else "normal")
    assert browser.find_element(By.ID, "error").text == ""
    wait.until(lambda d: d.execute_script("const h = document.getElementById('heatmap');"
                                          "return h.complete && h.naturalWidth > 0;"))
    size = browser.execute_script("const h = document.getElementById('heatmap'); return [h.naturalWidth, "
                                  "h.naturalHeight, getComputedStyle(document.getElementById('view')).display];")
    assert size == [serve_app.config.eval.resize, serve_app.config.eval.resize, "block"]
    browser.save_screenshot(str(tmp_path / "page.png"))  # kept in pytest's tmp dir for a look by hand


def test_page_shows_the_error_of_a_bad_file(serve_app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is text, not a PNG")
    browser.get(serve_app.url)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 60, poll_frequency=0.2).until(lambda d: d.find_element(By.ID, "error").text != "")
    assert browser.find_element(By.ID, "error").text.startswith("error 400:")
    assert not browser.find_element(By.ID, "result").is_displayed()
