"""A real browser opens the report: headless Chromium (Debian's `chromium` package) loads report.html from
file://, runs its script, and we read the resulting DOM (--dump-dom) and the console (--enable-logging):
every chart drawn, the table sorts on a click, no script errors, and a full-page screenshot in tmp_path; and the
layout, measured in the browser at 1280 and 1920 px (LAYOUT): no table wider than its box, every chart at least a
third of the page's width, no chart label outside its svg, no legend entry broken over two lines."""
import html as htmllib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from runner.report import build_report, gather, write_report
from test_compare import fixture_sweep, fixture_with_long_run, real_runs  # noqa: F401  (real_runs: a session fixture)

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
  document.body.setAttribute("data-hidden", item.getAttribute("data-variant") + ";" + hidden.length);
  document.body.setAttribute("data-height", document.documentElement.scrollHeight);
})();</script></body>"""


# Measures the page as laid out (getBoundingClientRect) and writes the numbers into <body data-layout> as JSON.
LAYOUT = """<script>(function () {
  var root = document.documentElement, r = function (node) { return node.getBoundingClientRect(); };
  var column = document.querySelector("section");  // the page's content column (body's content box)
  var out = {window: root.clientWidth, column: r(column).width, page: [root.scrollWidth, root.clientWidth],
             boxes: [], charts: [], clipped: [], broken: []};
  document.querySelectorAll(".table-wrap").forEach(function (box) {
    out.boxes.push([box.id || box.parentNode.id || box.closest("section").id, box.scrollWidth, box.clientWidth]); });
  document.querySelectorAll("figure.chart").forEach(function (fig) {
    var name = fig.getAttribute("data-chart") + ":" + (fig.getAttribute("data-kind") || fig.getAttribute("data-key")
               || fig.getAttribute("data-index") || "");
    out.charts.push([name, r(fig).width]);
    fig.querySelectorAll("svg").forEach(function (svg) {
      var box = r(svg);
      svg.querySelectorAll("text").forEach(function (t) {
        var b = r(t);
        if (b.width && (b.left < box.left - 0.5 || b.right > box.right + 0.5 || b.top < box.top - 0.5
                        || b.bottom > box.bottom + 0.5)) out.clipped.push(name + ": " + t.textContent);
      });
    });
    var edge = r(fig).right;
    fig.querySelectorAll(".legend span").forEach(function (item) {  // one line, inside the figure
      var b = r(item), em = parseFloat(getComputedStyle(item).fontSize);
      if (b.height > 2 * em || b.right > edge + 0.5) out.broken.push(name + ": " + item.textContent); });
  });
  document.body.setAttribute("data-layout", JSON.stringify(out));
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


def layout(html_path, tmp_path, width) -> dict:
    """The page's layout facts (LAYOUT) in a window `width` px wide."""
    page = tmp_path / f"layout-{width}.html"
    page.write_text((html_path.parent / "report.html").read_text().replace("</body>", LAYOUT))
    out, console = chromium(tmp_path, f"--window-size={width},1000", "--dump-dom", page.as_uri())
    assert out.returncode == 0, out.stderr[-2000:]
    assert_clean(out.stdout, console)
    return json.loads(htmllib.unescape(re.search(r'data-layout="([^"]*)"', out.stdout).group(1)))


def assert_layout_holds(html_path, tmp_path):
    for width in (1280, 1920):
        facts = layout(html_path, tmp_path, width)
        assert facts["window"] == width
        assert facts["page"][0] <= facts["page"][1], f"{width} px: the page scrolls sideways: {facts['page']}"
        assert facts["boxes"] and all(wide <= box for _, wide, box in facts["boxes"]), f"{width} px: {facts['boxes']}"
        assert {name for name, _ in facts["charts"]} >= {"curves:val", "curves:train", "pareto:"}
        narrow = [(name, w) for name, w in facts["charts"] if w < facts["column"] / 3]
        assert not narrow, f"{width} px: charts under a third of the page ({facts['column']:.0f} px): {narrow}"
        assert facts["clipped"] == [], f"{width} px: labels outside their chart"
        assert facts["broken"] == [], f"{width} px: legend entries broken over two lines"


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


def render_fixture(tmp_path):
    """The report over the runs a fixture wrote under tmp_path/outputs, opened in the browser:
    (runs, report.html, dom, console messages, page height)."""
    runs = gather([tmp_path / "outputs"])
    write_report(build_report(runs, ["outputs"]), tmp_path / "report", png=False)
    html = tmp_path / "report" / "report.html"
    return (runs, html, *open_report(html, tmp_path))


def test_report_renders_in_chromium(tmp_path):
    fixture_sweep(tmp_path)
    runs, html, dom, console, height = render_fixture(tmp_path)
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
    assert_layout_holds(html, tmp_path)
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
    assert_layout_holds(html, tmp_path)
    screenshot(html, tmp_path, height)


def test_layout_with_a_run_left_out(tmp_path):
    """A long run of another budget (another sweep) stays in the runs table, out of every chart: the curves span
    the compared runs' tokens only, and the layout holds at 1280 and 1920 px (issue 26)."""
    fixture_with_long_run(tmp_path)
    runs, html, dom, console, height = render_fixture(tmp_path)
    assert_clean(dom, console)
    compared = [r for r in runs if r["left_out"] is None]
    assert len(compared) == len(runs) - 1
    train = re.search(r'<figure [^>]*data-kind="train".*?</figure>', dom, re.S).group(0)
    assert train.count('class="series"') == len(compared)  # every compared run has a training curve; not the long one
    ticks = [t for t in re.findall(r'<text [^>]*text-anchor="middle"[^>]*>([\d.]+k?)</text>', train)]
    top = max(float(t.rstrip("k")) * (1000 if t.endswith("k") else 1) for t in ticks)
    assert top <= 1280 * 1.25  # the compared runs' 10 steps x 128 tokens set the axis, not the long run's 300 steps
    assert_layout_holds(html, tmp_path)
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
