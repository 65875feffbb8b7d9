"""The report in a real browser: headless Chromium (Debian package `chromium`) loads the page
with no console errors (the page's Content-Security-Policy turns any external fetch or script
into one), the DOM holds every section, and a screenshot shows the plots.

`make test` installs Chromium (target `browser`). Under CI (environment variable CI=true) a
missing Chromium fails this test; elsewhere it is skipped with the reason."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import make_report_runs
from effopd.report import SECTION_IDS, build_report

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
WIDTH, HEIGHT = 1400, 4000
INSTALL = "as root, `make browser` or apt-get update && apt-get install -y chromium fonts-liberation"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def chromium_bin() -> str:
    path = shutil.which("chromium")
    if path is None:
        if in_ci():
            pytest.fail(f"CI=true but headless Chromium is not on PATH, so the report rendering test cannot run: {INSTALL}")
        pytest.skip(f"needs headless Chromium on PATH (`chromium`): {INSTALL}")
    return path


def chromium(binary, tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]  # console.* output, JS and CSP errors
    assert not console, "\n".join(console)
    return proc


def test_report_renders_in_chromium(chromium_bin, tmp_path_factory, tmp_path):
    runs = make_report_runs(tmp_path_factory, ("opd", "bare"))
    page = build_report([runs / "opd", runs / "bare"], tmp_path / "report.html", labels=["OPD", "no analysis"])
    url = page.resolve().as_uri()

    dom = chromium(chromium_bin, tmp_path, "--dump-dom", url).stdout
    assert re.findall(r'<section id="([^"]+)"', dom) == list(SECTION_IDS)
    assert dom.count("<img ") == page.read_text().count("<img ") >= 10
    assert "could not be rendered" not in dom

    shot = tmp_path / "report.png"
    chromium(chromium_bin, tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", url)
    assert shot.exists() and shot.stat().st_size > 100_000
    img = (imread(shot)[:, :, :3] * 255).astype(np.uint32)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    rgb = img[..., 0] << 16 | img[..., 1] << 8 | img[..., 2]
    colours = len(np.unique(rgb))
    assert colours > 1000, f"only {colours} distinct colours: the plots did not render"
    background = (rgb == rgb[-1, -1]).mean()
    assert background < 0.9, f"{background:.0%} of the screenshot is background"


@pytest.mark.parametrize("ci", [True, False])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(ci, tmp_path):
    """The rendering test run with no `chromium` on PATH: a failure naming the cause under CI=true,
    a skip with the reason otherwise (so a CI run cannot pass without ever rendering the page)."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path / "empty-bin")
    if ci:
        env["CI"] = "true"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'tmp'}",
           f"{Path(__file__).resolve()}::test_report_renders_in_chromium"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    if ci:
        assert proc.returncode == 1 and "1 error" in out and "CI=true but headless Chromium is not on PATH" in out, out[-3000:]
    else:
        assert proc.returncode == 0 and "1 skipped" in out and "needs headless Chromium on PATH" in out, out[-3000:]
