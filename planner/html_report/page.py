"""The report page: the charts of svg.py, tables and a summary in one self-contained HTML file.

Styles and the tooltip script are inlined; nothing is fetched, so the page opens offline.
"""

from __future__ import annotations

from planner.html_report.data import BUSY_KINDS, POST_KINDS
from planner.html_report.fmt import esc, number, pct, seconds, size
from planner.html_report.svg import (KIND_LABELS, MEMORY_LABELS, bars_svg, breakdown_svg, loss_svg, memory_svg,
                                     stacked_bar, timeline_svg)

KIND_COLOURS = {"forward": "#4e79a7", "backward": "#59a14f", "recompute": "#f28e2b", "communication": "#e15759",
                "p2p": "#b07aa1", "dp_comm": "#ff9da7", "optimizer": "#9c755f", "host": "#bab0ac",
                "idle": "#ececec"}
MEMORY_COLOURS = {"params": "#4e79a7", "grads": "#76b7b2", "optimizer": "#edc948", "activations": "#f28e2b",
                  "other": "#bab0ac", "margin": "#e8e8e8"}
TIME_COLOURS = {"compute": "#4e79a7", "recompute": "#f28e2b", "bubble": "#c9c9c9", "tp_comm": "#e15759",
                "ep_comm": "#59a14f", "pp_comm": "#b07aa1", "dp_comm_exposed": "#ff9da7", "optimizer": "#9c755f",
                "host": "#bab0ac"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f6f4}
main{max-width:1200px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:0 0 6px}
section{background:#fff;border:1px solid #e2e2de;border-radius:8px;padding:14px 18px;margin:14px 0}
.sub,.note{color:#555}.note{font-size:13px;margin:4px 0 8px}.warn{color:#a33}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;margin:10px 0}
.card{border:1px solid #e2e2de;border-radius:6px;padding:8px 12px}
.card .v{font-size:22px;font-weight:600}.card .k{color:#666;font-size:12px;text-transform:uppercase}
.gauge{height:8px;background:#eee;border-radius:4px;margin:6px 0 2px;overflow:hidden}
.gauge div{height:8px;background:#4e79a7}.gauge div.over{background:#c33}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:middle}
th{color:#666;font-weight:500}td.n,th.n{text-align:right;white-space:nowrap}td.nw{white-space:nowrap}tr.best td{font-weight:600}
table.kv td:first-child{color:#666;padding-right:18px}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;margin:4px 0 6px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
svg.chart{max-width:100%;height:auto;display:block}
svg text{font:11px system-ui,sans-serif;fill:#444}svg text.op{fill:#fff;font-size:10px;pointer-events:none}
svg text.lbl{font-size:11px;fill:#333}
.grid{stroke:#e6e6e6;stroke-width:1}.mark{stroke:#333;stroke-dasharray:3 3}
.usable{stroke:#c33;stroke-width:1.5;stroke-dasharray:6 4}.capacity{stroke:#777;stroke-width:1}
.predicted{stroke:#c33;stroke-width:1.5;stroke-dasharray:6 4}
.loss{fill:none;stroke:#4e79a7;stroke-width:2}.pt{fill:#4e79a7}
.hit{fill:transparent}.k-idle{stroke:none}
[data-tip]:hover>rect,rect[data-tip]:hover,circle[data-tip]:hover{filter:brightness(0.85)}
#tip{position:fixed;display:none;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:6px 9px;
border-radius:5px;white-space:pre-line;max-width:420px;z-index:10;box-shadow:0 2px 8px rgba(0,0,0,.25)}
details{margin-top:8px}summary{cursor:pointer;color:#555}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;color:#fff;background:#4a4}
.badge.no{background:#c33}
"""

SCRIPT = """
(function(){
  var tip=document.getElementById('tip');
  function hide(){tip.style.display='none';}
  document.addEventListener('mousemove',function(e){
    var t=e.target&&e.target.closest?e.target.closest('[data-tip]'):null;
    if(!t){hide();return;}
    tip.textContent=t.getAttribute('data-tip');
    tip.style.display='block';
    var r=tip.getBoundingClientRect(),x=e.clientX+14,y=e.clientY+14;
    if(x+r.width>window.innerWidth-8){x=Math.max(4,e.clientX-r.width-14);}
    if(y+r.height>window.innerHeight-8){y=Math.max(4,e.clientY-r.height-14);}
    tip.style.left=x+'px';tip.style.top=y+'px';
  });
  document.addEventListener('mouseleave',hide);
  window.addEventListener('scroll',hide,{passive:true});
})();
"""


def _colour_css() -> str:
    rules = [f".k-{k}{{fill:{v}}}" for k, v in KIND_COLOURS.items()]
    rules += [f".m-{k}{{fill:{v}}}" for k, v in MEMORY_COLOURS.items()]
    rules += [f".t-{k}{{fill:{v}}}" for k, v in TIME_COLOURS.items()]
    return "".join(rules)


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{col}"></i>{esc(label)}</span>'
                                            for label, col in items) + "</div>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows) + "</table>"


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    if len(set(layers)) == 1:
        return f"{layers[0]} x {len(layers)}"
    return ",".join(map(str, layers)) if len(layers) <= 16 else f"{min(layers)}-{max(layers)} x {len(layers)}"


# ---------------------------------------------------------------------------------------------- sections
def summary_section(s: dict) -> str:
    fill = s["peak_reserved_bytes"] / s["usable_bytes"] if s["usable_bytes"] else 1.0
    status = ('<span class="badge">fits</span>' if s["feasible"]
              else f'<span class="badge no">does not fit</span> <span class="warn">{esc(s["reason"])}</span>')
    cards = [
        ("step time", seconds(s["step_time_s"]), f"{number(s['tokens_per_s'])} tokens/s"),
        ("MFU", pct(s["mfu"]), f"{s['tflops_per_gpu']:.1f} model TFLOP/s per GPU "
                              f"({s['hardware_tflops_per_gpu']:.1f} with recompute)"),
        ("peak memory", f"{size(s['peak_reserved_bytes'])}",
         f"of {size(s['usable_bytes'])} usable ({size(s['capacity_bytes'])} capacity), stage {s['fullest_stage']}; "
         f"{size(s['peak_memory_bytes'])} allocated"),
        ("binds", s["binding"].split(" (")[0], s["binding"]),
    ]
    html = ['<section id="summary"><h2>The plan</h2>', f'<p>{status}</p><div class="cards">']
    for i, (k, v, sub) in enumerate(cards):
        gauge = ""
        if i == 2:
            gauge = (f'<div class="gauge" data-tip="{esc(f"{fill:.0%} of the usable memory")}">'
                     f'<div class="{"over" if fill > 1 else ""}" style="width:{min(fill, 1.0) * 100:.1f}%"></div></div>')
        html.append(f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div>{gauge}'
                    f'<div class="note">{esc(sub)}</div></div>')
    html.append("</div>")
    params = f"{s['params'] / 1e9:.2f} B" if s["params"] >= 1e9 else f"{s['params'] / 1e6:.3g} M"
    rows = [("model", f"{s['model']}: {params} parameters, {s['layers']} layers"),
            ("cluster", f"{s['cluster']}: {s['nodes']} x {s['gpus_per_node']} {s['gpu']} ({s['gpus']} GPUs)"),
            ("engine", s["engine"]),
            ("configuration", f"{s['config']}, {s['microbatches']} micro-batches, layers per chunk "
                              f"{_layers(s['layers_per_stage'])}, rank order {s['layout']}"),
            ("training", f"global batch {s['global_batch']} x {s['seq_len']} tokens, {s['precision']}, "
                         f"{s['optimizer']}"),
            ("binds", s["binding"]), ("critical stage", str(s["critical_stage"]))]
    html.append(_kv(rows) + "</section>")
    return "".join(html)


def _hop_seconds(hops: list[float]) -> str:
    """Each hop's transfer time, as one value when the hops are alike, else their range."""
    lo, hi = min(hops, default=0.0), max(hops, default=0.0)
    return f"{seconds(hi)} each" if lo == hi else f"{seconds(lo)} to {seconds(hi)} by hop"


def timeline_section(tl: dict) -> str:
    kinds = list(BUSY_KINDS) + (["p2p"] if tl["p2p_s"] > 0 and not tl["aggregated"] else []) + list(POST_KINDS)
    legend = _legend([(KIND_LABELS[k], KIND_COLOURS[k]) for k in kinds + ["idle"]])
    name = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": f"interleaved 1F1B ({tl['vpp']} chunks per stage)"}
    notes = [f"{name[tl['schedule']]}, {tl['microbatches']} micro-batches on {tl['pp']} stages, simulated "
             f"event by event (planner/cost/schedule.py) from the cost model's per-stage times. Transfers between "
             f"stages ({_hop_seconds(tl['hops_s'])}) are link delays; data-parallel communication and the "
             f"optimizer follow the whole pipeline, as the cost model charges them."]
    if abs(tl["step_s"] - tl["closed_form_step_s"]) > 1e-6 * tl["closed_form_step_s"]:
        notes.append(f"Simulated step {seconds(tl['step_s'])}; the cost model's closed form gives "
                     f"{seconds(tl['closed_form_step_s'])} (it charges each transfer to the devices' cycle and "
                     f"takes the slowest stage as the steady state).")
    if abs(tl["closed_form_step_s"] - tl["predicted_step_s"]) > 1e-6 * tl["predicted_step_s"]:
        notes.append(f'<span class="warn">The plan file predicted {seconds(tl["predicted_step_s"])}; this '
                     f"meshplan re-costs its configuration at {seconds(tl['closed_form_step_s'])} (another "
                     f"version, or a --profile the plan was made with).</span>")
    if tl["aggregated"]:
        notes.append(f"{tl['operations']:,} operations are too many to draw one by one: each row is cut into "
                     f"time bins of {seconds(tl['bin_s'])}, merged where the mix of work stays the same, and "
                     f"each segment is stacked by the share of each kind. Hover for the numbers.")
    else:
        notes.append("Boxes are numbered by micro-batch" + (" and chunk" if tl["vpp"] > 1 else "")
                     + "; hover any box, transfer or row for its numbers.")
    body = "".join(f'<p class="note">{n if n.startswith("<span") else esc(n)}</p>' for n in notes)
    return (f'<section id="timeline"><h2>Pipeline timeline of one step</h2>{body}{legend}'
            f"{timeline_svg(tl)}</section>")


def memory_section(mem: dict) -> str:
    legend = _legend([(MEMORY_LABELS[k], MEMORY_COLOURS[k]) for k in MEMORY_COLOURS]
                     + [("usable memory", "#c33"), ("capacity", "#777")])
    head = "".join(f'<th class="n">{esc(h)}</th>' for h in ("stage", "layers", *MEMORY_LABELS, "total", "reserved"))
    rows = []
    for s in mem["stages"]:
        cells = [str(s["stage"]), str(s["layers"])] + [size(v) for v in s["parts"].values()] + [
            size(s["margin"]), size(s["total"]), size(s["reserved"])]
        rows.append("<tr>" + "".join(f'<td class="n">{esc(x)}</td>' for x in cells)
                    + f"<td>{esc(s['peak_phase'])}</td></tr>")
    table = (f"<details><summary>memory table, every stage</summary><table><tr>{head}<th>peaks in</th></tr>"
             + "".join(rows) + "</table></details>")
    return (f'<section id="memory"><h2>Memory per GPU by pipeline stage</h2>'
            f'<p class="note">Bytes held on the fullest GPU of each stage at its peak, by kind; the allocator '
            f"margin on top makes the reserved bytes that must stay under the usable line. Below each stage: the "
            f"phase of the step where it peaks.</p>{legend}{memory_svg(mem)}{table}</section>")


def breakdown_section(bd: dict) -> str:
    legend = _legend([(p["label"], TIME_COLOURS[p["key"]]) for p in bd["parts"]])
    rows = "".join(f'<tr><td>{esc(p["label"])}</td><td class="n">{esc(seconds(p["seconds"]))}</td>'
                   f'<td class="n">{esc(pct(p["share"]))}</td></tr>' for p in bd["parts"] if p["seconds"] > 0)
    return (f'<section id="breakdown"><h2>Step time on the critical path: {esc(seconds(bd["step_time_s"]))}</h2>'
            f"{legend}{breakdown_svg(bd)}<table>{rows}</table></section>")


def alternatives_section(alt: dict) -> str:
    rows = alt["rows"]
    scale = max(r["step_time_s"] for r in rows)
    head = "".join(f'<th class="{"n" if h in ("#", "step", "vs best", "tokens/s", "MFU", "peak") else ""}">'
                   f"{esc(h)}</th>" for h in ("#", "configuration", "layout", "step", "vs best", "tokens/s", "MFU",
                                              "peak", "step by part", "why slower"))
    body = []
    for r in rows:
        fit = "" if r["feasible"] else ' <span class="warn">(does not fit)</span>'
        tip = "\n".join(f"{alt['labels'][k]}: {seconds(v)}" for k, v in r["time"].items() if v > 0)
        body.append(f'<tr class="{"best" if r["rank"] == 1 else ""}"><td class="n">{r["rank"]}</td>'
                    f'<td class="nw">{esc(r["config"])}{fit}</td><td class="nw">{esc(r["layout"])}</td>'
                    f'<td class="n">{esc(seconds(r["step_time_s"]))}</td>'
                    f'<td class="n">{"-" if r["rank"] == 1 else esc(pct(r["slower"], signed=True))}</td>'
                    f'<td class="n">{esc(number(r["tokens_per_s"]))}</td><td class="n">{esc(pct(r["mfu"]))}</td>'
                    f'<td class="n">{esc(size(r["peak_reserved_bytes"]))}</td>'
                    f'<td data-tip="{esc(tip)}">{stacked_bar(r["time"], scale)}</td><td>{esc(r["why"])}</td></tr>')
    note = ("The search's runners-up, each with the two parts of the step that grew most against the chosen "
            "configuration." if len(rows) > 1 else
            "This plan holds no alternatives (it was written by `meshplan estimate`; `meshplan plan` keeps the "
            "runners-up).")
    return (f'<section id="alternatives"><h2>The chosen configuration and the alternatives</h2>'
            f'<p class="note">{esc(note)}</p><table><tr>{head}</tr>{"".join(body)}</table></section>')


def run_section(run: dict) -> str:
    labels = {"step_time_s": "step time (median, first step excluded)", "tokens_per_s": "tokens/s",
              "tflops_per_gpu": "model TFLOP/s per device", "mfu": "MFU", "peak_memory_bytes": run["memory_label"]}
    fmt = {"step_time_s": seconds, "tokens_per_s": number, "tflops_per_gpu": lambda v: "-" if v is None else
           f"{v:.4g}", "mfu": pct, "peak_memory_bytes": size}
    rows = "".join(f'<tr><td>{esc(labels[f["key"]])}</td><td class="n">{esc(fmt[f["key"]](f["predicted"]))}</td>'
                   f'<td class="n">{esc(fmt[f["key"]](f["measured"]))}</td><td class="n">{_error(f["error_pct"])}'
                   f"</td></tr>" for f in run["figures"])
    step_items = [{"group": r["rank"], "value": r["step_time_s"], "cls": "k-forward",
                   "tip": f"rank {r['rank']} (pp {r['pp']}, dp {r['dp']}, tp {r['tp']}): median step "
                          f"{seconds(r['step_time_s'])}\nsteps: " + ", ".join(seconds(t) for t in r["step_times_s"][:40])}
                  for r in run["ranks"]]
    step_chart = bars_svg(step_items, [(run["predicted_step_time_s"], "predicted",
                                        f"predicted {seconds(run['predicted_step_time_s'])}")],
                          seconds, "measured step time per rank")
    mem_items = []
    for r in run["ranks"]:
        who = f"rank {r['rank']} (pp {r['pp']}, dp {r['dp']}, tp {r['tp']})"
        mem_items.append({"group": r["rank"], "value": r["memory_bytes"], "cls": "m-params",
                          "tip": f"{who}\nmeasured {size(r['memory_bytes'])} ({run['memory_label']})"})
        mem_items.append({"group": r["rank"], "value": r["predicted_memory_bytes"], "cls": "m-grads",
                          "tip": f"{who}\npredicted {size(r['predicted_memory_bytes'])} (stage {r['pp']} total)"})
    mem_chart = bars_svg(mem_items, [], size, "memory per rank, measured and predicted")
    step_legend = _legend([("measured (median over steps, first excluded)", KIND_COLOURS["forward"]),
                           ("predicted", "#c33")])
    mem_legend = _legend([("measured: " + run["memory_label"], MEMORY_COLOURS["params"]),
                          ("predicted: the stage total", MEMORY_COLOURS["grads"])])
    return (f'<section id="run"><h2>Measured against predicted</h2><p class="note">{run["world_size"]} ranks on '
            f'{esc(run["device"])}, {run["steps"]} steps.</p><table><tr><th>figure</th><th class="n">predicted'
            f'</th><th class="n">measured</th><th class="n">error</th></tr>{rows}</table>'
            f'<h2 style="margin-top:14px">Step time per rank</h2>{step_legend}{step_chart}'
            f'<h2>Memory per rank</h2>{mem_legend}{mem_chart}<h2>Loss</h2>{loss_svg(run["losses"])}</section>')


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def footer(s: dict) -> str:
    parts = [f"{k}: {v}" for k, v in s["sources"].items()]
    if s["search"]:
        st = s["search"]
        parts.append(f"search: {st['candidates']:,} candidates, {st['evaluated']:,} costed in {st['seconds']:.2f} s")
    return f'<p class="note">{esc("; ".join(parts))}</p>'


def render_page(data: dict) -> str:
    """The whole page from page_data()'s dict."""
    s = data["summary"]
    title = f"meshplan: {s['model']} on {s['cluster']}, {s['config']}"
    sections = [summary_section(s), timeline_section(data["timeline"]), memory_section(data["memory"]),
                breakdown_section(data["breakdown"]), alternatives_section(data["alternatives"])]
    if data["run"] is not None:
        sections.append(run_section(data["run"]))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f"<style>{CSS}{_colour_css()}</style></head><body><main><h1>{esc(title)}</h1>"
            f'<p class="sub">{s["gpus"]} GPUs, global batch {s["global_batch"]} x {s["seq_len"]} tokens, '
            f'engine {esc(s["engine"])}</p>' + "".join(sections) + footer(s)
            + f'</main><div id="tip" role="tooltip"></div><script>{SCRIPT}</script></body></html>')
