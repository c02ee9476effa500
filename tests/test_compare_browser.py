"""A real browser opens the report: headless Chromium (Debian's `chromium` package) loads report.html from
file://, runs its script, and we read the resulting DOM (--dump-dom) and the console (--enable-logging):
every chart drawn, the table sorts on a click, no script errors, and a full-page screenshot in tmp_path."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runner.report import build_report, gather, write_report
from test_compare import fixture_sweep, real_runs  # noqa: F401  (real_runs is a session fixture)

CHROMIUM = os.environ.get("CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y "
                                                          "chromium; .ci/run installs it); set CHROMIUM=/path to use another")

# Runs after the page's own script: sorts the runs table by perplexity, descending (two clicks), hides a
# variant through the scatter plot's legend, and records what happened and the page height.
HARNESS = """<script>(function () {
  var th = Array.prototype.filter.call(document.querySelectorAll("#runs-table th"),
                                       function (h) { return h.textContent === "val ppl"; })[0];
  th.click(); th.click();
  var col = Array.prototype.indexOf.call(th.parentNode.children, th);
  var order = Array.prototype.map.call(document.querySelectorAll("#runs-table tbody tr"),
                                       function (row) { return row.cells[col].getAttribute("data-v"); });
  document.body.setAttribute("data-sorted", order.join(";"));
  var item = document.querySelector('figure[data-chart="pareto"] .legend span');  // hide one variant
  item.click();
  var hidden = Array.prototype.filter.call(document.querySelectorAll('figure[data-chart="pareto"] circle'),
                                           function (c) { return c.style.display === "none"; });
  document.body.setAttribute("data-hidden", item.textContent + ";" + hidden.length);
  document.body.setAttribute("data-height", document.documentElement.scrollHeight);
})();</script></body>"""


def chromium(tmp_path, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--mute-audio", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    console = re.findall(r':CONSOLE[^\]]*\] "(.*)", source: (\S*)', out.stderr)
    return out, console


def open_report(html_path, tmp_path):
    """Load the page (with the test harness appended) and return (dom, console messages, page height)."""
    page = tmp_path / "page.html"
    shutil.copy(html_path.parent / "report.html", page)  # PNGs are not needed by the page
    page.write_text(page.read_text().replace("</body>", HARNESS))
    out, console = chromium(tmp_path, "--window-size=1400,1000", "--dump-dom", page.as_uri())
    assert out.returncode == 0, out.stderr[-2000:]
    height = int(re.search(r'data-height="(\d+)"', out.stdout).group(1))
    return out.stdout, console, height


def screenshot(html_path, tmp_path, height) -> Path:
    shot = tmp_path / "report.png"
    out, console = chromium(tmp_path, f"--window-size=1400,{min(height + 20, 16000)}", f"--screenshot={shot}",
                            html_path.as_uri())
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000  # not a blank page
    return shot


def charts(dom) -> dict:
    """{chart kind and key: data-rendered} for every <figure data-chart=...>."""
    found = {}
    for tag in re.findall(r"<figure [^>]*>", dom):
        kind = re.search(r'data-chart="(\w+)"', tag).group(1)
        which = re.search(r'data-(?:kind|key|index)="(\w+)"', tag)
        rendered = re.search(r'data-rendered="(\w+)"', tag)
        found[f"{kind}:{which.group(1) if which else ''}"] = rendered.group(1) if rendered else None
    return found


def assert_clean(dom, console):
    assert re.search(r'<html[^>]* data-ready="true"', dom), "the page script did not finish"
    errors = re.search(r'<html[^>]* data-errors="([^"]*)"', dom)
    assert errors is None, f"script errors: {errors and errors.group(1)}"
    assert console == [], f"console output: {console}"


def test_report_renders_in_chromium(tmp_path):
    fixture_sweep(tmp_path)
    runs = gather([tmp_path / "outputs"])
    write_report(build_report(runs, ["outputs"]), tmp_path / "report", png=False)
    html = tmp_path / "report" / "report.html"
    dom, console, height = open_report(html, tmp_path)
    assert_clean(dom, console)
    assert charts(dom) == {"curves:val": "true", "curves:train": "true", "pareto:": "true",
                           "bars:peak_memory_bytes": "true", "bars:kv_cache_bytes_per_token": "true",
                           "effect:0": "true", "effect:1": "true"}
    ok = [r for r in runs if r["status"] == "ok"]
    assert dom.count('class="point"') == len(ok)  # one scatter point per finished run
    assert dom.count('class="series"') == 2 * len(ok) + 2  # val and train lines; failed runs have train only
    assert dom.count('class="front-line"') == 1 and dom.count('class="effect-row"') == 2 + 3
    assert dom.count('class="bar"') == 6 + 7  # by variant: 6 benchmarked; KV also for the failed run's variant
    assert dom.count("<tr") >= len(runs) + 1
    sorted_ppl = [float(v) if v else None for v in re.search(r'data-sorted="([^"]*)"', dom).group(1).split(";")]
    finite = [v for v in sorted_ppl if v is not None]
    assert finite == sorted(finite, reverse=True) and sorted_ppl[len(finite):] == [None] * (len(runs) - len(finite))
    label, n_hidden = re.search(r'data-hidden="([^";]*);(\d+)"', dom).groups()
    assert int(n_hidden) == sum(r["variant_label"] == label for r in ok) > 0
    screenshot(html, tmp_path, height)


def test_report_from_real_runs_renders_in_chromium(real_runs, tmp_path):
    cwd, _ = real_runs
    html = cwd / "outputs" / "compare" / "report.html"
    dom, console, height = open_report(html, tmp_path)
    assert_clean(dom, console)
    drawn = charts(dom)
    # runs trained with train.bench=false have no peak memory: that chart says so instead of drawing
    assert drawn.pop("bars:peak_memory_bytes") in ("true", "empty")
    assert set(drawn.values()) == {"true"} and "effect:0" in drawn
    screenshot(html, tmp_path, height)


def test_telemetry_curves_render_in_chromium(tmp_path):
    """The telemetry section's three charts draw a line per run with telemetry, a diverged run's included."""
    from test_telemetry import add_telemetry
    sweep = fixture_sweep(tmp_path)
    files = sorted(sweep.rglob("results.json"))
    add_telemetry(files[0])
    add_telemetry(files[1], diverged=True)
    write_report(build_report(gather([tmp_path / "outputs"]), ["outputs"]), tmp_path / "report", png=False)
    dom, console, _ = open_report(tmp_path / "report" / "report.html", tmp_path)
    assert_clean(dom, console)
    figures = re.findall(r'<figure [^>]*data-kind="telemetry"[^>]*>', dom)
    assert len(figures) == 3 and all('data-rendered="true"' in f for f in figures)
    section = dom.split('id="telemetry"')[1].split("</section>")[0]
    assert section.count('class="series"') == 3 * 2
