"""Headless Chromium for the console's browser tests: Debian's chromium + chromedriver (found on PATH; make venv
installs them) driven by Selenium (the [dev] extra), a fixed 1280x800 page, docs-sized screenshots, and a
polling wait."""

from __future__ import annotations

import importlib.util
import io
import shutil
import time
from pathlib import Path

from tests.harness.requires import requires

# looked up on PATH as make venv's `command -v chromium` / `command -v chromedriver` does (Debian: /usr/bin)
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# checked before any fixture runs (no stack or model is set up for a test that cannot run); a failure under CI=true
needs_browser = [
    requires(CHROMIUM and CHROMEDRIVER,
             "chromium + chromedriver are not on PATH: `apt-get install chromium chromium-driver` (make venv does)"),
    requires(importlib.util.find_spec("selenium") is not None,
             "selenium is not installed (the [dev] extra has it: make venv)"),
]


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800",
              "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    inner = drv.execute_script("return [window.innerWidth, window.innerHeight];")
    drv.set_window_size(1280 + 1280 - inner[0], 800 + 800 - inner[1])  # a 1280x800 page, whatever the chrome
    return drv


def shot(drv, out: Path, name: str) -> None:
    """The 1280x800 page as a 256-colour PNG (docs-sized: ~30-180 KB)."""
    from PIL import Image

    img = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out / f"{name}.png", optimize=True)


def wait_for(pred, timeout_s: float, what: str, why=lambda: ""):
    """``pred()``'s first truthy value within ``timeout_s``, else an AssertionError with ``why()``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{why()}")
