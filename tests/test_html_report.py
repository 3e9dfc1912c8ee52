"""The numbers behind each chart of `meshplan report` against the prediction's own numbers, the page's
size and escaping, and the CLI (`report`, `plan --html`). The page in a real browser: test_html_browser.py."""

from __future__ import annotations

import json

import pytest

from planner.cost.model import CostModel
from planner.html_report import build_html
from planner.html_report.data import (MEMORY_KINDS, TIME_BINS, alternatives_data, breakdown_data, memory_data,
                                      page_data, run_data, summary_data, timeline_data)
from planner.html_report.inputs import RunReport, evaluate_plan
from planner.loaders import load_cluster, load_model
from planner.plan import Plan, make_plan
from planner.report import why_slower
from planner.specs import ModelSpec, ParallelConfig, TrainingSpec
from tests.cli_helpers import run_cli
from tests.report_helpers import fake_run_report
from tests.runtime_helpers import make_test_plan


def plan_and_core(model="gpt3-13b", cluster="dgx-a100-80gb", nodes=4, batch=256, seq=2048, **config):
    m, c = load_model(model), load_cluster(cluster, nodes=nodes)
    t = TrainingSpec(global_batch=batch, seq_len=seq)
    cost = CostModel(m, c, t)
    core = cost.evaluate_core(ParallelConfig(**config))
    return make_plan(m, c, t, cost.prediction(core)), core


CONFIGS = [
    dict(tp=4, pp=4, dp=2, schedule="1f1b"),
    dict(tp=4, pp=4, dp=2, schedule="gpipe", recompute="full"),
    dict(tp=2, pp=4, dp=4, schedule="interleaved", vpp=2, recompute="selective", sp=True, zero=1),
    dict(tp=4, pp=2, dp=4, zero=3, recompute="full"),
    dict(tp=8, pp=1, dp=4, zero=2),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_timeline_work_by_kind_is_the_step_breakdown(config):
    """On the critical stage the simulated timeline holds, by kind, exactly what the breakdown charges:
    forward + backward kernels = compute, recompute = recompute, communication = TP collectives plus the
    exposed ZeRO traffic of every micro-batch; after the pipeline, the device with the longest tail holds the
    optimizer step and the rest of the exposed DP communication."""
    plan, core = plan_and_core(**config)
    tl = timeline_data(plan, core)
    t = plan.predicted.time
    crit = tl["stages"][plan.predicted.critical_stage]["busy"]
    host_mb = core.work.host_microbatch * core.nmb
    assert crit["forward"] + crit["backward"] == pytest.approx(t.compute + host_mb, rel=1e-9)
    assert crit["recompute"] == pytest.approx(t.recompute, rel=1e-9, abs=1e-12)
    tail = max(tl["stages"], key=lambda s: (s["busy"]["dp_comm"] + s["busy"]["optimizer"], s["busy"]["dp_comm"],
                                            s["busy"]["optimizer"]))["busy"]
    assert tail["optimizer"] == pytest.approx(t.optimizer, rel=1e-9)
    assert tail["host"] + host_mb == pytest.approx(t.host, rel=1e-9)
    assert crit["communication"] - t.tp_comm == pytest.approx(t.dp_comm_exposed - tail["dp_comm"], rel=1e-9,
                                                              abs=1e-12)
    assert tl["closed_form_step_s"] == pytest.approx(plan.predicted.step_time_s, rel=1e-12)
    # every stage: busy + idle is the step, and the simulation never beats the busiest device's work
    for st in tl["stages"]:
        assert sum(st["busy"].values()) + st["idle"] == pytest.approx(tl["step_s"], rel=1e-9)
        assert st["idle"] >= -1e-9
    assert tl["step_s"] >= max(sum(st["busy"].values()) for st in tl["stages"]) - 1e-9


@pytest.mark.parametrize("engine", ["meshplan", "megatron"])
def test_gpipe_timeline_is_the_predicted_step(engine):
    """GPipe's phases are flow shops of identical jobs, so the closed form is exact with transfers as link
    delays (torch.distributed.pipelining) or as busy device time (blocking send/recv): the simulated step is the
    cost model's, and pp_comm is what the transfers cost on the critical path (2(p-1)c, or c per pass)."""
    from planner.engine import load_engine
    m, c = load_model("gpt3-175b"), load_cluster("dgx-a100-80gb", nodes=16)
    t = TrainingSpec(global_batch=512, seq_len=2048)
    eng = load_engine(engine).model_copy(update={"schedules": ["gpipe", "1f1b", "interleaved"]})
    cost = CostModel(m, c, t, engine=eng)
    core = cost.evaluate_core(ParallelConfig(tp=8, pp=8, dp=2, schedule="gpipe", recompute="full"))
    plan = make_plan(m, c, t, cost.prediction(core), engine=eng)
    tl = timeline_data(plan, core)
    pp_comm, p2p, nmb = plan.predicted.time.pp_comm, tl["p2p_s"], tl["microbatches"]
    assert pp_comm > 0 and p2p > 0
    blocking = eng.overlap.pp_p2p == "exposed"
    assert pp_comm == pytest.approx(2 * (nmb + 7) * p2p if blocking else 2 * 7 * p2p, rel=1e-12)
    assert tl["step_s"] == pytest.approx(plan.predicted.step_time_s, rel=1e-9)


def test_detailed_timeline_draws_every_operation_with_the_cost_models_pieces():
    plan, core = plan_and_core(tp=2, pp=4, dp=4, schedule="interleaved", vpp=2, recompute="full")
    tl = timeline_data(plan, core)
    m, p, v = tl["microbatches"], 4, 2
    assert not tl["aggregated"] and len(tl["ops"]) == tl["operations"] == 2 * m * p * v
    w = core.work
    for o in tl["ops"]:
        want = (w.forward if o["op"] == "F" else w.backward)(o["stage"], o["chunk"])
        want = [(k, s) for k, s in want if s > 0]
        assert [x["kind"] for x in o["pieces"]] == [k for k, _ in want]
        assert [x["end"] - x["start"] for x in o["pieces"]] == pytest.approx([s for _, s in want], rel=1e-9)
    assert {(o["stage"], o["op"], o["chunk"], o["microbatch"]) for o in tl["ops"]} == {
        (i, op, c, j) for i in range(p) for op in "FB" for c in range(v) for j in range(m)}
    assert len(tl["transfers"]) == 2 * m * (p * v - 1)
    html = build_html(plan, core=core)
    assert html.count('data-tip="stage ') >= len(tl["ops"])


def test_64_stages_and_hundreds_of_microbatches_are_aggregated_and_small():
    """1T GPT on 64 stages, 2 chunks each, 512 micro-batches (131,072 operations): each row is a few merged
    time segments whose seconds by kind add up to the row's work, and the page stays far under 5 MB."""
    plan, core = plan_and_core(model="gpt-1t", nodes=128, batch=1024, tp=8, pp=64, dp=2, schedule="interleaved",
                               vpp=2, recompute="full")
    tl = timeline_data(plan, core)
    assert tl["aggregated"] and tl["operations"] == 2 * 512 * 64 * 2 and tl["pp"] == 64
    for st, segments in zip(tl["stages"], tl["segments"]):
        assert 1 <= len(segments) <= TIME_BINS
        assert segments[0]["start"] == 0 and segments[-1]["end"] == pytest.approx(tl["pipeline_s"])
        for kind in ("forward", "backward", "recompute", "communication"):
            assert sum(s["seconds"].get(kind, 0.0) for s in segments) == pytest.approx(st["busy"][kind], rel=1e-9)
        assert sum(sum(s["seconds"].values()) for s in segments) == pytest.approx(tl["pipeline_s"], rel=1e-9)
        assert min(s["microbatches"][0] for s in segments if s["microbatches"]) == 0
        assert max(s["microbatches"][1] for s in segments if s["microbatches"]) == 511
    html = build_html(plan, core=core)
    assert len(html.encode()) < 5_000_000
    assert html.count("<rect") < 20_000


def test_memory_chart_is_the_predicted_stage_memory():
    plan, _ = plan_and_core(tp=2, pp=4, dp=4, recompute="selective")
    mem = memory_data(plan.predicted)
    want = plan.predicted.memory
    assert mem["usable_bytes"] == want.usable_bytes and mem["capacity_bytes"] == want.capacity_bytes
    assert len(mem["stages"]) == 4
    for got, s in zip(mem["stages"], want.stages):
        assert got["parts"] == {k: getattr(s, k) for k in MEMORY_KINDS}
        assert sum(got["parts"].values()) == got["total"] == s.total
        assert got["total"] + got["margin"] == got["reserved"] == s.reserved
        assert got["peak_phase"] == s.peak_phase
        assert got["fits"] == (s.reserved <= want.usable_bytes)
    assert mem["fullest_stage"] == max(want.stages, key=lambda s: s.reserved).stage


def test_the_peak_phase_shows_on_the_memory_chart():
    plan, core = plan_and_core(tp=2, pp=4, dp=4)
    phases = ["forward", "backward", "backward", "optimizer"]
    plan.predicted.memory.stages = [s.model_copy(update={"peak_phase": ph})
                                    for s, ph in zip(plan.predicted.memory.stages, phases)]
    assert [s["peak_phase"] for s in memory_data(plan.predicted)["stages"]] == phases
    html = build_html(plan, core=core)
    assert html.count(">optimizer</text>") == 1 and "peaks in: backward" in html


def test_breakdown_and_alternatives_are_the_predictions():
    """The plan as `meshplan plan` makes it: the search's top 4."""
    from planner.search.search import search
    from planner.search.space import Constraints
    m, c = load_model("gpt3-1.3b"), load_cluster("dgx-a100-80gb", nodes=2)
    t = TrainingSpec(global_batch=64, seq_len=2048)
    cost = CostModel(m, c, t)
    result = search(m, c, t, Constraints(), top_k=4, cost=cost)
    preds = [cost.prediction(core) for core in result.top]
    plan = make_plan(m, c, t, preds[0], alternatives=preds[1:])
    bd = breakdown_data(plan.predicted)
    assert {p["key"]: p["seconds"] for p in bd["parts"]} == plan.predicted.time.model_dump()
    assert sum(p["seconds"] for p in bd["parts"]) == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert sum(p["share"] for p in bd["parts"]) == pytest.approx(1.0)
    alt = alternatives_data(plan)
    assert [r["rank"] for r in alt["rows"]] == [1, 2, 3, 4]
    for row, p in zip(alt["rows"], preds):
        assert row["config"] == p.config.short() and row["step_time_s"] == p.predicted.step_time_s
        assert row["time"] == p.predicted.time.model_dump() and row["mfu"] == p.predicted.mfu
        assert row["slower"] == pytest.approx(p.predicted.step_time_s / preds[0].predicted.step_time_s - 1)
    assert alt["rows"][0]["why"] == "chosen"
    assert [r["why"] for r in alt["rows"][1:]] == [why_slower(preds[0], p) for p in preds[1:]]


def test_summary_is_the_plan_and_names_the_engine():
    plan, _ = plan_and_core(tp=4, pp=4, dp=2)
    s = summary_data(plan)
    p = plan.predicted
    assert (s["step_time_s"], s["tokens_per_s"], s["mfu"]) == (p.step_time_s, p.tokens_per_s, p.mfu)
    assert (s["peak_reserved_bytes"], s["usable_bytes"], s["capacity_bytes"]) == (
        p.peak_reserved_bytes, p.memory.usable_bytes, p.memory.capacity_bytes)
    assert s["binding"] == p.binding and s["config"] == plan.config.short() and s["gpus"] == 32
    assert s["engine"] == "meshplan"
    from planner.engine import load_engine
    other = plan.model_copy(update={"engine": load_engine("torchtitan", compile=True)})
    assert summary_data(other)["engine"] == "torchtitan (compiled)"


@pytest.mark.parametrize("memory_kind", ["cpu_peak_rss", "cuda_max_allocated"])
def test_run_charts_are_the_run_reports_numbers(memory_kind):
    plan = make_test_plan(tp=2, pp=2, dp=2)
    report = fake_run_report(plan, memory_kind)
    run = run_data(plan, RunReport.model_validate(report))
    ranks = sorted(report["measured"]["per_rank"], key=lambda r: r["rank"])
    key = "peak_memory_increase_bytes" if memory_kind == "cpu_peak_rss" else "peak_memory_bytes"
    assert [r["step_time_s"] for r in run["ranks"]] == [r["step_time_s"] for r in ranks]
    assert [r["memory_bytes"] for r in run["ranks"]] == [r[key] for r in ranks]
    assert [r["predicted_memory_bytes"] for r in run["ranks"]] == [
        plan.predicted.memory.stages[r["pp"]].total for r in ranks]
    assert [x["loss"] for x in run["losses"]] == report["losses"] and run["losses"][0]["step"] == 1
    figures = {f["key"]: f for f in run["figures"]}
    assert figures["step_time_s"]["measured"] == report["measured"]["step_time_s"]
    assert figures["peak_memory_bytes"]["measured"] == report["measured"][key]
    assert figures["mfu"]["error_pct"] == report["error_pct"]["mfu"]
    assert run["predicted_step_time_s"] == plan.predicted.step_time_s
    html = build_html(plan, RunReport.model_validate(report))
    assert 'id="run"' in html and html.count('<circle class="pt"') == 6


def test_names_from_the_users_files_are_escaped():
    plan = make_test_plan(model=ModelSpec(**{**load_model("gpt-tiny").model_dump(), "name": "<script>x()</script>"}))
    html = build_html(plan)
    assert "<script>x()" not in html and "&lt;script&gt;x()" in html
    assert html.count("<script>") == 1


def test_page_is_self_contained():
    plan, core = plan_and_core(tp=4, pp=4, dp=2)
    html = build_html(plan, core=core)
    assert html.startswith("<!doctype html>") and html.endswith("</html>")
    for outside in ("http://", "https://", "src=", "@import", "url("):
        assert outside not in html, outside
    assert set(page_data(plan, core)) == {"summary", "timeline", "memory", "breakdown", "alternatives", "run"}


def test_evaluate_plan_recosts_the_plans_configuration():
    plan, core = plan_and_core(tp=2, pp=4, dp=4, schedule="interleaved", vpp=2, zero=1)
    again = evaluate_plan(Plan.model_validate_json(plan.model_dump_json()))
    assert again.step == core.step == plan.predicted.step_time_s
    assert again.chunks == core.chunks


# ---------------------------------------------------------------------------------------------- CLI
def test_report_and_plan_html_commands(capsys, tmp_path):
    plan_file, html = tmp_path / "plan.json", tmp_path / "plan.html"
    r = run_cli(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2",
                "--global-batch", "64", "-o", plan_file, "--html", html)
    assert r.code == 0, r.err
    assert f"report written to {html}" in r.out
    page = html.read_text()
    plan = Plan.model_validate_json(plan_file.read_text())
    assert plan.config.short() in page and 'id="alternatives"' in page and page.count("<tr class=") == 5
    # the same plan through `meshplan report`: the same page
    out = tmp_path / "report.html"
    r = run_cli(capsys, "report", plan_file, "-o", out)
    assert r.code == 0, r.err
    assert out.read_text() == page
    # refused: an existing output, a missing plan, a plan given as the run, a directory that does not exist
    for args, message in [(["-o", out], f"--output: '{out}' exists; pass --force to overwrite it"),
                          (["--run", plan_file, "-o", tmp_path / "x.html"], "is not a meshplan run report"),
                          (["-o", tmp_path / "no" / "x.html"], "does not exist")]:
        r = run_cli(capsys, "report", plan_file, *args)
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = run_cli(capsys, "report", tmp_path / "none.json", "-o", tmp_path / "x.html")
    assert r.code == 2 and "no such file" in r.err
    r = run_cli(capsys, "plan", "--model", "gpt3-1.3b", "--cluster", "dgx-a100-80gb", "--nodes", "2",
                "--global-batch", "64", "--html", html)
    assert r.code == 2 and "--html" in r.err and "exists" in r.err


def test_report_command_with_a_run(capsys, tmp_path):
    plan = make_test_plan(tp=2, pp=2, dp=2)
    plan_file, run_file = tmp_path / "plan.json", tmp_path / "run.json"
    plan_file.write_text(plan.model_dump_json())
    run_file.write_text(json.dumps(fake_run_report(plan, "cpu_peak_rss")))
    for args in ([plan_file, "--run", run_file], [run_file]):       # a run report holds its plan
        out = tmp_path / "r.html"
        r = run_cli(capsys, "report", *args, "-o", out, "--force")
        assert r.code == 0, r.err
        assert 'id="run"' in out.read_text()
    other = make_test_plan(tp=1, pp=2, dp=4)
    other_file = tmp_path / "other.json"
    other_file.write_text(other.model_dump_json())
    r = run_cli(capsys, "report", other_file, "--run", run_file, "-o", tmp_path / "o.html")
    assert r.code == 2 and "the run report is for tp2 pp2 dp2" in r.err, r.err
