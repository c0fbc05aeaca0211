"""Screenshots of what a newcomer looks at, taken in headless Chromium: the documentation's home page,
a demo run's report.html, and the listening page of its A/B kit.

    python docs/screenshots.py --out /tmp/esn-shots            # builds the site, runs `esn demo`, exports a kit
    python docs/screenshots.py --out shots --demo demo-out --site site   # reuse a finished demo and a built site

Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium (a
development dependency). Each page is captured whole (the window grown to its height, up to 8000 px).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 1280
MAX_HEIGHT = 8000


def browser():
    """Headless Chromium through selenium, with the flags that work offline and as root."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        sys.exit("no headless browser: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
                 "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                 f"--window-size={WIDTH},900", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def shoot(driver, url: str, path: Path, *, height: int | None = None) -> Path:
    """The page at ``url`` as a PNG: the whole page, or its first ``height`` pixels."""
    driver.set_window_size(WIDTH, 900)
    driver.get(url)
    full = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
    driver.set_window_size(WIDTH, min(height or full, MAX_HEIGHT))
    driver.save_screenshot(str(path))
    return path


def start_trial(driver) -> None:
    """On the listening page: type a rater id and press its first button, to show a trial, not the form."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        driver.find_element(By.CSS_SELECTOR, "input[type=text], input:not([type])").send_keys("demo-rater")
        driver.find_element(By.CSS_SELECTOR, "button").click()
        time.sleep(0.5)
    except WebDriverException as exc:  # another page layout: the page as it opens
        print(f"listening page: no rater form to fill ({type(exc).__name__}); shooting it as it opens")


LOADS = """
const done = arguments[arguments.length - 1];
const players = [...document.querySelectorAll('audio')];
let left = players.length, ok = 0;
if (!left) done([0, 0]);
for (const a of players) {
  const settle = (good) => { ok += good; if (--left === 0) done([ok, players.length]); };
  a.addEventListener('loadedmetadata', () => settle(1), {once: true});
  a.addEventListener('error', () => settle(0), {once: true});
  a.preload = 'metadata'; a.load();
}
"""


def players_load(driver, url: str) -> tuple[int, int]:
    """(clips whose file loads, players) on the page at ``url``: the report's relative clip paths resolve."""
    driver.get(url)
    driver.set_script_timeout(30)
    ok, n = driver.execute_async_script(LOADS)
    return ok, n


def esn(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "esn", *args], check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    """Take the three screenshots into ``--out``; print their paths."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--demo", type=Path, help="a finished `esn demo --out DIR` (default: run one)")
    parser.add_argument("--site", type=Path, help="a built documentation site (default: mkdocs build)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="esn-shots-"))
    site = args.site
    if site is None:
        site = work / "site"
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "--site-dir", str(site)], check=True, cwd=ROOT)
    demo = args.demo
    if demo is None:
        demo = work / "demo"
        esn("demo", "--out", str(demo), "--quiet")
    kit = demo / "human" / "ab-kit"
    if not (kit / "index.html").exists():
        esn("human", "export", str(demo / "demo.toml"), "--per-emotion", "2", "--quiet")
    driver = browser()
    try:
        report = (demo / "report.html").resolve().as_uri()
        shots = [shoot(driver, (site / "index.html").resolve().as_uri(), args.out / "docs-home.png"),
                 shoot(driver, report, args.out / "report.png")]
        print("report.html: {} of {} clips load in the browser".format(*players_load(driver, report)))
        driver.set_window_size(WIDTH, 1000)
        driver.get((kit / "index.html").resolve().as_uri())
        start_trial(driver)
        driver.save_screenshot(str(args.out / "listening.png"))
        shots.append(args.out / "listening.png")
    finally:
        driver.quit()
    for path in shots:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
