"""The HTML report: the SVG helpers and the page as text, then the page in headless Chromium (it
loads offline with no console errors; every plot is there with its data marks inside the figure;
flipped items open), with a screenshot saved as a test artifact.

Chromium: /usr/bin/chromium and /usr/bin/chromedriver (`make system-deps` as root installs them),
driven through selenium (the `test` extra). The browser tests skip when they are missing, except
under CI (env CI set), where they fail.
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from html import escape
from pathlib import Path

import numpy as np
import pytest
from report_data import HOSTILE, measured_speed_models, synthetic_record

from quantgate.record import RunRecord, load_record

from quantgate.report import plots, svg, view
from quantgate.report.files import write_reports
from quantgate.report.html import render_html

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900",
                  "--host-resolver-rules=MAP * ~NOTFOUND")  # offline: any external fetch would fail and log an error


# ---- SVG helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("lo,hi", [(0, 1), (0.31, 1.0), (143.8, 538.1), (-3, 7), (0.001, 0.0013), (57.3, 176.0)])
def test_nice_ticks_cover_the_range_in_round_equal_steps(lo, hi):
    ticks = svg.nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0], rtol=1e-9)
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(math.isclose(mantissa, m, rel_tol=1e-9) for m in (1, 2, 2.5, 5))
    assert 3 <= len(ticks) <= 9


def test_log_ticks_are_round_values_inside_the_range():
    assert svg.log_ticks(0.002, 40) == [0.01, 0.1, 1, 10]  # four decades: powers of ten only
    ticks = svg.log_ticks(0.3, 12)  # under three decades: 1-2-5 steps
    assert ticks == pytest.approx([0.5, 1, 2, 5, 10])


def test_scale_maps_linear_log_and_reversed():
    assert svg.Scale(0, 10, 100, 200)(2.5) == pytest.approx(125)
    assert svg.Scale(1, 100, 0, 200, log=True)(10) == pytest.approx(100)
    assert svg.Scale(2, 8, 300, 100, log=True)(4) == pytest.approx(200)  # reversed pixel range, log midpoint


def test_pareto_front_matches_the_definition():
    xs, ys = [1, 2, 3, 2.5, 4], [0.3, 0.9, 1.0, 0.8, 1.0]
    assert svg.pareto_front(xs, ys, "low") == [0, 1, 2]  # (2.5, .8) and (4, 1) are beaten by (2, .9) and (3, 1)
    assert svg.pareto_front(xs, ys, "high") == [4]
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 6, 12).tolist(), rng.integers(0, 6, 12).tolist()  # ties on purpose
        front = set(svg.pareto_front(x, y, "low"))
        for i in range(12):
            beaten = any(x[j] <= x[i] and y[j] >= y[i] and (x[j] < x[i] or y[j] > y[i]) for j in range(12))
            assert (i in front) == (not beaten)


def _marks(svg_text: str) -> list[ET.Element]:
    root = ET.fromstring(svg_text)  # well-formed XML, or this raises
    return [el for el in root.iter() if "mark" in (el.get("class") or "").split()]


def expected_marks(results: RunRecord) -> dict[str, int]:
    """How many data marks each plot must hold, counted from the record itself."""
    cands, models = results.candidates, results.models
    bits = sum(v is not None for c in cands if c.bits for v in (
        c.vs_baseline.recovery, c.vs_baseline.top1_agreement, c.vs_baseline.flips.rate))
    klds = [(v, ci) for c in cands for v, ci in ((c.vs_baseline.kld_mean, c.vs_baseline.kld_mean_ci),
                                                 (c.vs_baseline.kld_p99, c.vs_baseline.kld_p99_ci))]
    kld = sum(v is not None and v > 0 for v, _ in klds)
    whiskers = sum(bool(ci) and ci[0] is not None and ci[0] > 0 for v, ci in klds if v is not None and v > 0)
    out = {"plot-bits": bits, "plot-memory": len(models), "plot-kld": kld + whiskers}
    speed = measured_speed_models(results)
    load = sum(r.tokens_per_s is not None for m in models if m.name in speed for r in m.economics.load)
    out |= {"plot-speed": len(speed)} if len(speed) >= 2 else {}  # one point is nothing to compare
    out |= {"plot-load": load} if load else {}
    for i, c in enumerate(cands):
        hist = c.vs_baseline.kld_hist
        if hist:
            out[f"plot-kld-hist-{i}"] = sum(k > 0 for k in hist.counts)
    return out


def test_every_plot_is_well_formed_svg_with_one_mark_per_datum():
    results = synthetic_record()
    drawn = {"plot-bits": plots.bits_plot(results), "plot-memory": plots.memory_plot(results),
             "plot-speed": plots.speed_plot(results), "plot-load": plots.load_plot(results),
             "plot-kld": plots.kld_overview(results)}
    drawn |= {f"plot-kld-hist-{i}": s for i, s in enumerate(plots.kld_histograms(results))}
    assert {k: len(_marks(s)) for k, s in drawn.items()} == expected_marks(results)


def test_bits_plot_writes_out_what_accuracy_alone_would_hide():
    results = synthetic_record()
    loud = view.silent_losses(results)
    assert loud  # the synthetic run has 4-bit candidates that keep accuracy while answers flip
    texts = [t.text or "" for t in ET.fromstring(plots.bits_plot(results)).iter("text")]
    for short in ("recovery", "top-1", "flipped"):
        assert sum(t.endswith(f"% {short}") for t in texts) == len(loud)
    assert any(t.endswith(", ".join(sorted(loud))) for t in texts)  # the subtitle names them


def test_bit_groups_split_curves_only_where_widths_collide():
    cands = synthetic_record().candidates  # rtn 8, gptq 4 g128, rtn 4 g64, rtn 2 g64
    groups = plots.bit_groups(cands)
    assert {k: [c.bits for c in g] for k, g in groups.items()} == {"rtn": [8, 4, 2], "gptq": [4]}
    twin = cands[2].model_copy(update={"name": "rtn-w4-g128", "group_size": 128})  # a second rtn 4-bit
    groups = plots.bit_groups([*cands, twin])  # split by group size
    assert {k: [c.name for c in g] for k, g in groups.items()} == {
        "rtn": ["rtn-w8"], "gptq g128": ["gptq-w4-g128"], "rtn g64": ["rtn-w4-g64", "rtn-w2-g64"],
        "rtn g128": ["rtn-w4-g128"]}
    gguf = [cands[0].model_copy(update={"name": f"gguf-{t}", "method": "gguf", "bits": b, "group_size": None,
                                        "settings": {"imatrix": False}})
            for t, b in (("Q8_0", 8), ("Q4_K_M", 4), ("Q2_K", 2))]
    imatrix = gguf[1].model_copy(update={"name": "gguf-Q4_K_M-imatrix", "settings": {"imatrix": True}})
    groups = plots.bit_groups([*gguf, imatrix])  # llama.cpp types: one curve, the imatrix file beside it
    assert {k: [c.name for c in g] for k, g in groups.items()} == {
        "gguf": ["gguf-Q8_0", "gguf-Q4_K_M", "gguf-Q2_K"], "gguf imatrix": ["gguf-Q4_K_M-imatrix"]}


def test_simulated_speed_is_labeled_and_left_off_the_speed_plot():
    results = synthetic_record()
    simulated = [m.name for m in results.models if view.simulated(m)]
    assert simulated  # the synthetic run has one
    tips = [el.findtext("title") for el in _marks(plots.speed_plot(results))]
    assert not any(t.startswith(f"{name}:") for t in tips for name in simulated)
    assert sorted(t.split(":")[0] for t in tips) == sorted(measured_speed_models(results))
    economics = view.economics_table(results)
    sim_rows = [r for r in economics.rows if r.simulated]
    assert [r.cells[0] for r in sim_rows] == simulated
    assert all(view.SIMULATED in r.cells for r in sim_rows)
    assert view.SIMULATED in render_html(results)


def test_economics_rows_price_measured_models_wherever_cost_sits():
    results = synthetic_record()  # the baseline's cost sits beside its economics: upgrade moves it inside
    rows = {r.cells[0]: dict(zip(view.ECONOMICS_HEADERS, r.cells)) for r in view.economics_table(results).rows}
    for m in results.models:
        if m.name not in rows:
            assert not m.economics  # only models without economics are left out
            continue
        price = view.cost(m)
        assert price
        shown = rows[m.name]["$ / 1M tokens"]
        assert shown == (view.DASH if view.simulated(m) else view.money(price.per_million_tokens))
        lo, hi = m.economics.decode_tokens_per_s_range
        decode = rows[m.name]["decode tok/s (request range)"]
        assert decode == (view.SIMULATED if view.simulated(m) else
                          f"{view.rate(m.economics.decode_tokens_per_s)} ({lo:,.0f}–{hi:,.0f})")


def test_load_table_lists_every_measured_level_with_latencies():
    results = synthetic_record()
    table = view.load_table(results)
    measured = [m for m in results.models if m.economics and not view.simulated(m)]
    assert len(table.rows) == sum(len(m.economics.load) for m in measured)
    first = dict(zip(view.LOAD_HEADERS, table.rows[0].cells))
    level = measured[0].economics.load[0]
    assert first["model"] == measured[0].name and first["batch size"] == str(level.batch_size)
    assert first["latency p50 / p95 / p99"] == view.latencies(level.latency_s)
    assert not any(r.cells[0] in {m.name for m in results.models if view.simulated(m)} for r in table.rows)
    page = render_html(results)
    assert "Under load" in page and page.count('<table class="compact">') >= 3  # candidates, economics, load


def test_identical_notes_are_listed_once_with_every_name():
    assert view.grouped_notes([("a", "simulated"), ("b", "cheap"), ("c", "simulated")]) == [
        "a, c: simulated", "b: cheap"]
    assert view.grouped_notes([]) == []


def test_page_is_self_contained_and_escapes_item_text():
    page = render_html(synthetic_record())
    assert "<script" not in page.lower()  # no scripts at all, and the hostile prompt is escaped
    assert escape(HOSTILE) in page
    assert not re.search(r"https?://", page)
    links = re.findall(r"\b(?:src|href)\s*=\s*[\"']([^\"']*)", page)
    assert links and all(link.startswith("#") for link in links), links  # in-page links only
    assert "@import" not in page and not re.search(r"url\((?!#)", page)
    for plot_id in expected_marks(synthetic_record()):
        assert f'id="{plot_id}"' in page


def test_page_without_optional_parts_says_what_was_not_measured():
    results = synthetic_record(economics=False, noise_floor=False, kld_hist=False)
    page = render_html(results)
    assert "Economics not measured in this run" in page
    assert "Engine noise floor: not measured" in page
    assert "Per-token KLD histograms not recorded" in page
    assert 'id="plot-speed"' not in page and 'id="plot-kld-hist-0"' not in page
    assert 'id="plot-bits"' in page and 'id="plot-memory"' in page and 'id="plot-kld"' in page


def test_verdict_lists_every_rule_with_value_interval_threshold():
    results = synthetic_record()
    page = render_html(results)
    assert f"Recommended: {results.recommended}" in page
    for c in results.candidates:
        for r in view.rules(c):
            row = f'<td>{escape(r.rule)}</td><td><span class="chip {r.status}">{r.status}</span></td>'
            assert row in page
            assert escape(r.interval) in page and escape(r.threshold) in page


# ---- headless Chromium ---------------------------------------------------------------------

def _chromium_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        why = f"not installed: {', '.join(missing)} (`make system-deps` as root installs chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test; {why}")
        pytest.skip(why)
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _chromium_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Where screenshots go: $QUANTGATE_TEST_ARTIFACTS, else a temporary directory."""
    env = os.environ.get("QUANTGATE_TEST_ARTIFACTS")
    path = Path(env) if env else tmp_path_factory.mktemp("artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Each data mark's box and its figure's box, in CSS pixels.
MARK_BOXES = """
const svg = document.getElementById(arguments[0]);
const r = svg.getBoundingClientRect();
return {svg: [r.left, r.top, r.right, r.bottom],
        marks: [...svg.querySelectorAll('.mark')].map(m => { const b = m.getBoundingClientRect();
                                                            return [b.left, b.top, b.right, b.bottom]; })};
"""


def open_and_check(driver, html: Path, expected: dict[str, int]) -> None:
    """Load the page; no console errors; each plot shown, with `expected` marks all inside it."""
    from selenium.webdriver.common.by import By

    driver.get(html.as_uri())
    assert driver.title.startswith("quantgate report")
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    assert driver.execute_script("return document.scripts.length") == 0
    shown = {el.get_attribute("id") for el in driver.find_elements(By.CSS_SELECTOR, "svg.plot")}
    assert shown == set(expected)
    for plot_id, n in expected.items():
        boxes = driver.execute_script(MARK_BOXES, plot_id)
        left, top, right, bottom = boxes["svg"]
        assert right - left > 200 and bottom - top > 150, (plot_id, boxes["svg"])
        assert len(boxes["marks"]) == n, plot_id
        for ml, mt, mr, mb in boxes["marks"]:  # 1 px of slack for anti-aliased strokes
            assert left - 1 <= ml <= mr <= right + 1 and top - 1 <= mt <= mb <= bottom + 1, (plot_id, boxes)


def screenshot(driver, path: Path) -> Path:
    """The whole page (not only the window) as a PNG."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {path}")
    return path


def test_report_renders_in_headless_chromium(browser, tmp_path, artifacts):
    from selenium.webdriver.common.by import By

    results = synthetic_record()
    paths = write_reports(results, tmp_path)
    open_and_check(browser, paths["html"], expected_marks(results))
    screenshot(browser, artifacts / "report-synthetic.png")  # as a reader first sees it

    # flipped items start closed; opening one shows its prompts as text, not markup
    worst = results.candidates[-1]
    details = browser.find_element(By.CSS_SELECTOR, f'details.flips[data-candidate="{worst.name}"]')
    assert details.get_attribute("open") is None
    details.find_element(By.TAG_NAME, "summary").click()
    rows = details.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == len(worst.flipped_items)
    assert HOSTILE in rows[0].text
    assert browser.execute_script("return document.scripts.length") == 0


def test_report_without_optional_parts_renders(browser, tmp_path, artifacts):
    results = synthetic_record(economics=False, noise_floor=False, kld_hist=False)
    paths = write_reports(results, tmp_path)
    open_and_check(browser, paths["html"], expected_marks(results))
    screenshot(browser, artifacts / "report-minimal.png")


# At a phone's width: no sideways scroll of the page itself; every box that scrolls sideways shows
# its hint; chart text renders at >= 8 px; manifest values get lines of >= 30 characters.
PHONE_CHECKS = """
const px = v => parseFloat(v) || 0;
const page = document.documentElement.scrollWidth - window.innerWidth;
const hidden = [...document.querySelectorAll('.scroll')].filter(el => el.scrollWidth > el.clientWidth + 1)
  .filter(el => { const s = getComputedStyle(el, '::before'); return s.display === 'none' || !s.content
                  || s.content === 'none' || s.content === 'normal'; }).length;
const overflowing = [...document.querySelectorAll('.scroll')].filter(el => el.scrollWidth > el.clientWidth + 1).length;
let smallest = 1e9;
for (const svg of document.querySelectorAll('svg.plot')) {
  const scale = svg.getScreenCTM().a;
  for (const t of svg.querySelectorAll('text')) smallest = Math.min(smallest, px(getComputedStyle(t).fontSize) * scale);
}
const dd = [...document.querySelectorAll('dl.manifest dd')].map(d => d.clientWidth / px(getComputedStyle(d).fontSize) / 0.6);
return {page, hidden, overflowing, smallest, manifest_chars: Math.min(...dd), width: window.innerWidth};
"""


def test_report_is_readable_at_400px(browser, tmp_path, artifacts):
    """The report on a phone: Chromium emulating a 400 px wide screen."""
    results = synthetic_record()
    paths = write_reports(results, tmp_path)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 400, "height": 860, "deviceScaleFactor": 1, "mobile": True})
    try:
        open_and_check(browser, paths["html"], expected_marks(results))
        got = browser.execute_script(PHONE_CHECKS)
        screenshot(browser, artifacts / "report-synthetic-400px.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert got["width"] == 400, got
    assert got["page"] <= 0, got  # the page itself never scrolls sideways
    assert got["overflowing"] > 0 and got["hidden"] == 0, got  # wide tables and plots scroll, each with its hint
    assert got["smallest"] >= 8.0, got  # chart text legible (it was 3-4 px)
    assert got["manifest_chars"] >= 30, got  # manifest values not 2-3 characters per line


SMALL_RUN = (
    "candidates:\n  - {method: rtn, bits: 8}\n  - {method: rtn, bits: 4, group_size: 64}\n"
    "  - {method: rtn, bits: 2, group_size: 64}\n"
    "evaluation: {limit: 24, cloze_items: 12, ppl_windows: 2, window_tokens: 64}\n"
    "quality_gate: {min_items: 30}\n"
    "serving: {max_batch_size: 2}\n"
    "economics: {requests: 2, prompt_tokens: 16, new_tokens: 8, hardware_cost_per_hour: 1.0, tokens_per_month: 1.0e8}\n"
)


@pytest.mark.slow
def test_real_run_writes_a_report_that_renders(browser, tmp_path, artifacts):
    """`quantgate run` on the real default model (small subset) writes report.html and prints its
    path; the page renders from the real results.json."""
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_RUN)
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(config), "--results-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr
    (html,) = (tmp_path / "out").glob("*/report.html")
    assert f"report: {html}" in proc.stdout
    assert (html.parent / "summary.md").is_file()
    results = load_record(html.parent / "results.json")
    assert results.schema_version == 1
    open_and_check(browser, html, expected_marks(results))
    screenshot(browser, artifacts / "report-real-run.png")
