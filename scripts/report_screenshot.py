"""Render docs/report.png: `meshplan report` of a searched Llama 3 70B plan, in headless Chromium.

    python scripts/report_screenshot.py [--out docs/report.png] [--html report.html]

Needs Debian's `chromium` (apt-get install chromium) and the test extras (playwright, pillow).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cost.model import CostModel  # noqa: E402
from planner.html_report import build_html  # noqa: E402
from planner.loaders import load_cluster, load_model  # noqa: E402
from planner.plan import make_plan  # noqa: E402
from planner.search.search import search  # noqa: E402
from planner.search.space import Constraints  # noqa: E402
from planner.specs import TrainingSpec  # noqa: E402

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def example_html() -> str:
    """Llama 3 70B on 4 DGX H100 nodes, 4 pipeline stages of 1F1B, 32 sequences of 4,096 tokens."""
    m, c = load_model("llama3-70b"), load_cluster("dgx-h100", nodes=4)
    t = TrainingSpec(global_batch=32, seq_len=4096)
    cost = CostModel(m, c, t)
    result = search(m, c, t, Constraints(pp=4, schedule="1f1b"), top_k=5, cost=cost)
    preds = [cost.prediction(core) for core in result.top]
    return build_html(make_plan(m, c, t, preds[0], alternatives=preds[1:]), core=result.top[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/report.png"))
    ap.add_argument("--html", type=Path, help="Also keep the page here.")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright
    html = example_html()
    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "report.html"
        page_file.write_text(html)
        if args.html:
            shutil.copy(page_file, args.html)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = browser.new_page(viewport={"width": 1240, "height": 900})
            page.goto(page_file.as_uri())
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:,.0f} KiB)")


if __name__ == "__main__":
    main()
