#!/usr/bin/env python3
"""Open an HTML report in headless Chromium, take a screenshot, and check the page is not blank.

    python scripts/check_html.py outputs/<day>/b3_77-sweep/<id>/sweep_report.html [--png shot.png]

Chromium runs offline-ish (no background networking, no component updates, a throwaway profile), so a page
that needs the network to show its content shows it blank here. Checks: the screenshot exists, is a PNG of
the window size, and is not one flat colour: at least 2% of its pixels differ from the dominant (background)
colour and more than a handful of distinct colours appear (text and embedded plots). Exit 0 when the page
renders, 1 when it is blank or Chromium failed, 2 when Chromium or the file is missing.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
SIZE = (1400, 2000)


def screenshot(html: Path, png: Path, chromium: str = CHROMIUM, timeout_s: float = 120) -> None:
    with tempfile.TemporaryDirectory(prefix="greta-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               f"--screenshot={png}", f"--window-size={SIZE[0]},{SIZE[1]}", "--hide-scrollbars",
               html.resolve().as_uri()]
        subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=False)


def blank_reasons(png: Path) -> list[str]:
    """Why the screenshot looks blank (empty list: it shows content)."""
    if not png.is_file() or png.stat().st_size == 0:
        return [f"no screenshot written at {png}"]
    from PIL import Image  # matplotlib's dependency

    with Image.open(png) as im:
        im = im.convert("RGB")
        w, h = im.size
        colors = im.getcolors(maxcolors=w * h)
    reasons = []
    if (w, h) != SIZE:
        reasons.append(f"screenshot is {w}x{h}, expected {SIZE[0]}x{SIZE[1]}")
    colors.sort(reverse=True)
    background = colors[0][0]
    other = 1 - background / (w * h)
    if other < 0.02:
        reasons.append(f"only {other:.2%} of the pixels differ from the background colour {colors[0][1]}")
    if len(colors) < 50:
        reasons.append(f"only {len(colors)} distinct colours: no text or plots")
    return reasons


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--png", type=Path, default=None, help="where to keep the screenshot (default: beside the HTML)")
    ap.add_argument("--chromium", default=CHROMIUM)
    a = ap.parse_args(argv)
    if not (shutil.which(a.chromium) or Path(a.chromium).is_file()):
        print(f"check_html: {a.chromium} not found (apt-get install chromium)", file=sys.stderr)
        return 2
    if not a.html.is_file():
        print(f"check_html: {a.html} not found", file=sys.stderr)
        return 2
    png = a.png or a.html.with_suffix(".screenshot.png")
    if png.exists():
        png.unlink()
    try:
        screenshot(a.html, png, a.chromium)
    except subprocess.TimeoutExpired:
        print(f"check_html: chromium did not finish rendering {a.html}", file=sys.stderr)
        return 1
    reasons = blank_reasons(png)
    if reasons:
        print(f"BLANK {a.html}: " + "; ".join(reasons))
        return 1
    print(f"OK {a.html}: rendered, screenshot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
