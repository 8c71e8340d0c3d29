#!/usr/bin/env python
"""A screenshot of the service's page with results and a heatmap, for docs/service.md.

Starts ``pneumoscan serve`` on a free loopback port (throw-away audit log), opens the page
in headless Chromium (Debian's package, through Playwright), uploads a full-size pneumonia
film, a normal film and a text file, and saves the page once every card has its answer.

    python experiments/service_screenshot.py --out docs/service.png
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from pneumoscan.browser import find_chromium

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fullres_sample"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/service.png")
    p.add_argument("--width", type=int, default=1100)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen([sys.executable, "-m", "pneumoscan", "serve", "--port", str(port),
                                   "--audit_db", f"{tmp}/audit.sqlite3"])
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            notes = Path(tmp) / "notes.jpg"
            notes.write_text("not an image\n")
            files = [sorted((DATA / "PNEUMONIA").iterdir())[2], sorted((DATA / "NORMAL").iterdir())[0], notes]
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": args.width, "height": 900})
                page.goto(url + "/")
                expect(page.locator("#model-line")).to_contain_text("pneumoscan")
                page.set_input_files("#files", [str(f) for f in reversed(files)])
                expect(page.locator(".card[data-state=pending]")).to_have_count(0, timeout=120_000)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    # a palette keeps the PNG small; the heatmaps lose little at 256 colours
    img = Image.open(args.out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    img.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
