"""The report page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) loads it
offline with no console errors and no request beyond the file, draws every chart, shows a box's numbers on
hover, and its screenshot is not blank.

Chromium is installed with apt-get when it is missing (as CI's clean machine needs); the tests skip only
where apt-get cannot run (no apt-get, or not root)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import pytest
from PIL import Image

from planner.cost.model import CostModel
from planner.html_report import build_html
from planner.html_report.inputs import RunReport
from planner.loaders import load_cluster, load_model
from planner.plan import make_plan
from planner.search.search import search
from planner.search.space import Constraints
from planner.specs import ParallelConfig, TrainingSpec
from tests.report_helpers import fake_run_report

# no sandbox as root; no GPU; and none of the background connections a closed network refuses
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SECTIONS = ("summary", "timeline", "memory", "breakdown", "alternatives", "run")


def _install_chromium() -> str:
    path = shutil.which("chromium")
    if path:
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is missing and cannot be installed here: Debian's `chromium` package needs apt-get "
                    "run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    path = shutil.which("chromium")
    assert path, "apt-get installed chromium but it is not on PATH"
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright
    executable = _install_chromium()
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "XDG_CONFIG_HOME": str(home), "XDG_CACHE_HOME": str(home), "HOME": str(home)}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=FLAGS, env=env)
        yield b
        b.close()


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """Two reports: a searched plan (alternatives) with a run, and a 64-stage pipeline of 512 micro-batches."""
    tmp = tmp_path_factory.mktemp("pages")
    m, c = load_model("gpt3-13b"), load_cluster("dgx-a100-80gb", nodes=4)
    t = TrainingSpec(global_batch=128, seq_len=2048)
    cost = CostModel(m, c, t)
    result = search(m, c, t, Constraints(pp=4, schedule="1f1b"), top_k=4, cost=cost)
    preds = [cost.prediction(core) for core in result.top]
    plan = make_plan(m, c, t, preds[0], alternatives=preds[1:])
    run = RunReport.model_validate(json.loads(json.dumps(fake_run_report(plan, "cuda_max_allocated"))))
    (tmp / "plan.html").write_text(build_html(plan, run, result.top[0]))
    m, c = load_model("gpt-1t"), load_cluster("dgx-a100-80gb", nodes=128)
    t = TrainingSpec(global_batch=1024, seq_len=2048)
    cost = CostModel(m, c, t)
    core = cost.evaluate_core(ParallelConfig(tp=8, pp=64, dp=2, schedule="interleaved", vpp=2, recompute="full"))
    (tmp / "big.html").write_text(build_html(make_plan(m, c, t, cost.prediction(core)), core=core))
    return tmp


def open_page(browser, path):
    """(page, console errors and page errors, URLs requested) after loading `path`."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, requests = [], []
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(path.as_uri(), wait_until="load")
    return page, errors, requests


def not_blank(png: bytes) -> tuple[float, int]:
    """(share of pixels unlike the commonest colour, the page's background; distinct colours) of a screenshot."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 24)
    return 1 - max(colours)[0] / (img.width * img.height), len(colours)


def kind_pixels(png: bytes, rgb: tuple[int, int, int]) -> int:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(n for n, col in img.getcolors(maxcolors=1 << 24) if col == rgb)


def test_report_renders_without_errors_and_hover_shows_the_numbers(browser, pages):
    page, errors, requests = open_page(browser, pages / "plan.html")
    assert errors == []
    assert requests == [(pages / "plan.html").as_uri()]
    for section in SECTIONS:
        box = page.locator(f"#{section}").bounding_box()
        assert box and box["height"] > 60, section
    charts = page.locator("svg.chart")
    assert charts.count() >= 8
    for i in range(charts.count()):
        box = charts.nth(i).bounding_box()
        assert box and box["width"] > 100 and box["height"] > 10, i
    # hover the first backward operation of the timeline: the tooltip shows its data-tip
    op = page.locator("#timeline g[data-tip*='backward of micro-batch 0']").first
    op.hover()
    tip = page.locator("#tip")
    assert tip.is_visible()
    assert tip.inner_text().strip() == op.get_attribute("data-tip").strip()
    assert "backward of micro-batch 0" in tip.inner_text()
    page.mouse.move(2, 2)
    assert not tip.is_visible()
    # a memory bar and a loss point too
    page.locator("#memory g[data-tip]").first.hover()
    assert "total (max allocated)" in tip.inner_text()
    page.locator("#run circle[data-tip]").first.hover()
    assert tip.inner_text().startswith("step 1: loss")
    assert errors == []
    shot = page.screenshot(full_page=True)
    share, colours = not_blank(shot)
    assert share > 0.15 and colours > 50, (share, colours)
    timeline = page.locator("#timeline svg").screenshot()
    assert kind_pixels(timeline, (0x4e, 0x79, 0xa7)) > 500 and kind_pixels(timeline, (0x59, 0xa1, 0x4f)) > 500
    page.close()


def test_a_64_stage_pipeline_renders_aggregated(browser, pages):
    page, errors, _ = open_page(browser, pages / "big.html")
    assert errors == []
    rows = page.locator("#timeline rect.k-idle")
    assert rows.count() == 64
    heights = {round(rows.nth(i).bounding_box()["height"]) for i in (0, 31, 63)}
    assert min(heights) >= 6
    page.locator("#timeline g[data-tip*='micro-batches']").first.hover()
    assert "forward:" in page.locator("#tip").inner_text()
    timeline = page.locator("#timeline svg").screenshot()
    assert kind_pixels(timeline, (0x59, 0xa1, 0x4f)) > 2000
    assert errors == []
    page.close()
