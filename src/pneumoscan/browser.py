"""Rendering an HTML file to PNG with headless Chromium (Debian's ``chromium`` package)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary on PATH, or None."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 4200,
               timeout: float = 120.0) -> Path:
    """Open ``html_path`` in headless Chromium (no network) and save a ``width`` x ``height`` PNG.

    Raises:
        FileNotFoundError: Chromium is not installed (``apt-get install chromium``).
        RuntimeError: Chromium failed or wrote no PNG.
    """
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found; install Debian's package: apt-get install chromium")
    png_path = Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={png_path}", Path(html_path).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    return png_path
