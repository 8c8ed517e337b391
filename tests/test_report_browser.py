"""report.html in a real browser: headless Chromium (Debian's package, installed by `make test` when missing)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _browser(tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium/ChromeDriver not installed and not installable here (scripts/ensure-chromium.sh "
                    "needs root and apt-get); the browser check did not run")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,2400"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_images_tables_and_console_in_chromium(tmp_path, medsyngan_cache):
    from medsyngan.data.api import phantom_dataset
    from medsyngan.metrics import evaluate
    from medsyngan.report.html import write_report

    data = phantom_dataset(40, 2, 32, seed=5)
    images = np.asarray(data.images)
    rng = np.random.default_rng(0)
    fake = np.clip(images[:40].astype(int) + rng.integers(-20, 20, images[:40].shape), 0, 255).astype(np.uint8)
    ev = evaluate(fake, images[40:], images[:40], metrics="fd,kid,prdc,nn,msssim,privacy", kid_subset_size=20,
                  msssim_pairs=50, real_patients=data.patients[40:], train_patients=data.patients[:40],
                  epsilon=1.0, delta=1e-5)
    run_rows = [{"round": r, "kimg": r * 0.1, "d_loss": 1.0 / r, "epsilon": 0.3 * r} for r in range(1, 4)]
    report = write_report(tmp_path / "report.html", ev, fake, images[:40], run_rows=run_rows, title="browser check")

    browser = _browser(tmp_path)
    try:
        browser.get(report.as_uri())
        loaded = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0]);")
        tables = browser.execute_script("return document.querySelectorAll('table').length;")
        text = browser.execute_script("return document.body.innerText;")
        console = browser.get_log("browser")
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert len(loaded) >= 4, loaded
    assert all(ok for _, ok in loaded), [alt for alt, ok in loaded if not ok]
    assert tables >= 1
    assert "fd" in text and "ε" in text
    errors = [entry for entry in console if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    assert (tmp_path / "report.png").stat().st_size > 10_000
