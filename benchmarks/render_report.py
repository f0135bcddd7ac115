"""Screenshot an evaluation report with headless Chromium, to check the page as a reader sees it.

Not part of the test suite (CI has no browser). Usage:

    python benchmarks/render_report.py runs/eval/report.html /tmp/report.png
    python benchmarks/render_report.py runs/eval/report.json /tmp/report.png   # renders the HTML first
    python benchmarks/render_report.py report.html shot.png --size 1400,3000

A ``.json`` input (``report.json`` from ``faceshield.eval.report.write_report``) has no example images, so
its page shows the before/after section as text only; pass the ``report.html`` to see the crops.
Needs ``chromium`` (Debian: ``apt-get install -y chromium``) or ``chromium-browser`` / ``google-chrome``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from faceshield.eval.report import render_html

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def screenshot(html_path: Path, png_path: Path, size: str = "1400,3000", timeout: float = 120.0) -> Path:
    """Render ``html_path`` in headless Chromium (no network features) and save a PNG of the window."""
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        sys.exit("no chromium found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path.resolve()}",
               f"--window-size={size}", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not png_path.is_file():
        sys.exit(f"{browser} wrote no screenshot")
    return png_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html, or report.json to render first")
    parser.add_argument("png", type=Path, help="screenshot to write")
    parser.add_argument("--size", default="1400,3000", help="window WIDTH,HEIGHT in CSS pixels")
    args = parser.parse_args()
    html_path = args.report
    if args.report.suffix == ".json":
        html_path = args.png.with_suffix(".html")
        html_path.write_text(render_html(json.loads(args.report.read_text())), encoding="utf-8")
    print(screenshot(html_path, args.png, args.size))


if __name__ == "__main__":
    main()
