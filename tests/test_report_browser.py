"""The report in a real browser: headless Chromium (Debian package `chromium`) loads the page
with no console errors (the page's Content-Security-Policy turns any external fetch or script
into one), the DOM holds every section, and a screenshot shows the plots."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from effopd.report import SECTION_IDS, build_report
from test_report import make_runs  # the synthetic runs, built once per session

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
WIDTH, HEIGHT = 1400, 4000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium "
                                "(Debian: apt-get install -y chromium fonts-liberation)")


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]  # console.* output, JS and CSP errors
    assert not console, "\n".join(console)
    return proc


def test_report_renders_in_chromium(tmp_path_factory, tmp_path):
    runs = make_runs(tmp_path_factory, ("opd", "bare"))
    page = build_report([runs / "opd", runs / "bare"], tmp_path / "report.html", labels=["OPD", "no analysis"])
    url = page.resolve().as_uri()

    dom = chromium(tmp_path, "--dump-dom", url).stdout
    assert re.findall(r'<section id="([^"]+)"', dom) == list(SECTION_IDS)
    assert dom.count("<img ") == page.read_text().count("<img ") >= 10
    assert "could not be rendered" not in dom

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", url)
    assert shot.exists() and shot.stat().st_size > 100_000
    img = (imread(shot)[:, :, :3] * 255).astype(np.uint32)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    rgb = img[..., 0] << 16 | img[..., 1] << 8 | img[..., 2]
    colours = len(np.unique(rgb))
    assert colours > 1000, f"only {colours} distinct colours: the plots did not render"
    background = (rgb == rgb[-1, -1]).mean()
    assert background < 0.9, f"{background:.0%} of the screenshot is background"
