"""`meshplan report`: the plan (and a run) drawn in one self-contained HTML page.

Why hand-written SVG: the page must open offline and stay under 5 MB for 64-stage pipelines; a plotting
library would have to be embedded whole (plotly.min.js alone is several MB), while inline SVG with a dozen lines
of script for the tooltips costs nothing beyond the shapes drawn, renders in every browser, and keeps the
planner free of new dependencies. The charts are simple (boxes on a time axis, stacked bars, one line), so
little is lost.

Layout: inputs.py reads a run report and re-costs the plan's configuration, data.py extracts the numbers
behind each chart as plain dicts, svg.py draws the charts, page.py assembles the page.
"""

from __future__ import annotations

from planner.cost.model import Core
from planner.html_report.data import page_data
from planner.html_report.inputs import RunReport, evaluate_plan
from planner.html_report.page import render_page
from planner.plan import Plan


def build_html(plan: Plan, run: RunReport | None = None, core: Core | None = None) -> str:
    """The report page of a plan (and of a run of it); `core`: the plan's configuration as costed (default:
    re-costed by evaluate_plan)."""
    return render_page(page_data(plan, core if core is not None else evaluate_plan(plan), run))
