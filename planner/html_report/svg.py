"""Inline SVG charts of the report, drawn from the plain dicts of data.py.

Colours are CSS classes (`k-<kind>`, styled in page.py); every element a reader can hover carries its
numbers in a `data-tip` attribute, which the page's few lines of script show as a tooltip.
"""

from __future__ import annotations

import math

from planner.html_report.fmt import c, esc, pct, seconds, size, size_ticks, ticks

WIDTH = 1160
KIND_LABELS = {"forward": "forward", "backward": "backward", "recompute": "recompute",
               "communication": "communication (TP, ZeRO)", "p2p": "p2p transfer (link)",
               "dp_comm": "DP communication", "optimizer": "optimizer", "host": "host overhead", "idle": "idle"}
MEMORY_LABELS = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer states",
                 "activations": "activations", "other": "other (transient, buffers)", "margin": "allocator margin"}
STACK_ORDER = ("forward", "recompute", "backward", "communication")   # top to bottom in an aggregated segment


def _rect(x: float, y: float, w: float, h: float, cls: str, tip: str | None = None, extra: str = "") -> str:
    t = f' data-tip="{esc(tip)}"' if tip else ""
    return f'<rect class="{cls}" x="{c(x)}" y="{c(y)}" width="{c(max(w, 0.3))}" height="{c(h)}"{t}{extra}/>'


def _text(x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> str:
    a = "" if anchor == "start" else f' text-anchor="{anchor}"'
    k = f' class="{cls}"' if cls else ""
    return f'<text x="{c(x)}" y="{c(y)}"{k}{a}>{esc(text)}</text>'


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {c(width)} {c(height)}" width="{c(width)}" height="{c(height)}" '
            f'role="img" aria-label="{esc(label)}">' + "".join(body) + "</svg>")


def _x_axis(x0: float, y: float, w: float, top: float, fmt, bottom: float) -> list[str]:
    """Ticks along the top of a plot [x0, x0 + w] for values 0..top, grid lines down to `bottom`."""
    out = []
    for v in ticks(top, 8):
        x = x0 + w * v / top
        out.append(f'<line class="grid" x1="{c(x)}" y1="{c(y)}" x2="{c(x)}" y2="{c(bottom)}"/>')
        out.append(_text(x, y - 4, fmt(v), "tick", "middle"))
    return out


def _y_axis(x0: float, y0: float, h: float, w: float, top: float, fmt) -> list[str]:
    """Ticks up the left of a plot whose baseline is y0 + h, for values 0..top (round GiB or MiB when `fmt` is
    `size`), grid lines across `w`."""
    out = []
    for v in (size_ticks(top) if fmt is size else ticks(top, 5)):
        y = y0 + h - h * v / top
        out.append(f'<line class="grid" x1="{c(x0)}" y1="{c(y)}" x2="{c(x0 + w)}" y2="{c(y)}"/>')
        out.append(_text(x0 - 6, y + 4, fmt(v), "tick", "end"))
    return out


# ---------------------------------------------------------------------------------------------- timeline
def timeline_svg(tl: dict) -> str:
    """A row per stage over one step: operations (or aggregated segments), link transfers, what follows the
    last backward, and idle time as the row's background."""
    pp, step = tl["pp"], tl["step_s"]
    left, right, top = 74, 64, 26
    pw = WIDTH - left - right
    rh = max(8.0, min(34.0, 600.0 / pp))
    box = rh * (0.74 if not tl["aggregated"] and tl["p2p_s"] > 0 else 0.86)
    height = top + pp * rh + 40
    sx = pw / step

    def x(t: float) -> float:
        return left + t * sx

    body = _x_axis(left, top - 6, pw, step, seconds, top + pp * rh)
    label_every = math.ceil(13 / rh)       # row labels at least 13 px apart
    for st in tl["stages"]:
        i = st["stage"]
        y = top + i * rh
        busy = {k: v for k, v in st["busy"].items() if v > 0}
        tip = (f"stage {i} ({st['layers']} layers)" + ("  [critical]" if i == tl["critical_stage"] else "") + "\n"
               + "\n".join(f"{KIND_LABELS[k]}: {seconds(v)}" for k, v in busy.items())
               + f"\nidle: {seconds(st['idle'])} ({pct(st['idle'] / step)})")
        body.append(_rect(left, y + 1, pw, rh - 2, "k-idle", tip))
        if i % label_every == 0:
            body.append(_text(left - 6, y + rh / 2 + 4, f"stage {i}", "lbl", "end"))
        if i % label_every == 0:
            body.append(_text(left + pw + 6, y + rh / 2 + 4, f"idle {pct(st['idle'] / step)}", "tick"))
        for e in st["post"]:
            body.append(_rect(x(e["start"]), y + 1, (e["end"] - e["start"]) * sx, box, f"k-{e['kind']}",
                              f"stage {i}: {KIND_LABELS[e['kind']]} after the last backward\n"
                              f"{seconds(e['end'] - e['start'])} ({seconds(e['start'])} to {seconds(e['end'])})"))
    if tl["aggregated"]:
        body += _aggregated(tl, x, sx, top, rh, box)
    else:
        body += _operations(tl, x, sx, top, rh, box)
    end_y = top + pp * rh
    body.append(f'<line class="mark" x1="{c(x(tl["pipeline_s"]))}" y1="{top - 4}" x2="{c(x(tl["pipeline_s"]))}" '
                f'y2="{c(end_y + 4)}"/>')
    body.append(_text(x(tl["pipeline_s"]) - 4, end_y + 16, f"pipeline ends {seconds(tl['pipeline_s'])}", "tick",
                      "end"))
    body.append(_text(left + pw, end_y + 32, f"step ends {seconds(step)}", "tick", "end"))
    label = f"pipeline timeline of one step, {pp} stages, {tl['microbatches']} micro-batches"
    return _svg(WIDTH, height, body, label)


def _op_tip(o: dict, vpp: int) -> str:
    what = "forward" if o["op"] == "F" else "backward"
    where = f", chunk {o['chunk']}" if vpp > 1 else ""
    lines = [f"stage {o['stage']}: {what} of micro-batch {o['microbatch']}{where}",
             f"{seconds(o['start'])} to {seconds(o['end'])} ({seconds(o['end'] - o['start'])})"]
    lines += [f"{KIND_LABELS[p['kind']]}: {seconds(p['end'] - p['start'])}" for p in o["pieces"]]
    return "\n".join(lines)


def _operations(tl: dict, x, sx: float, top: float, rh: float, box: float) -> list[str]:
    """Each operation as a group of its pieces, numbered by micro-batch where it is wide enough."""
    out = []
    for o in tl["ops"]:
        y = top + o["stage"] * rh + 1
        rects = "".join(_rect(x(p["start"]), y, (p["end"] - p["start"]) * sx, box, f"k-{p['kind']}")
                        for p in o["pieces"])
        width = (o["end"] - o["start"]) * sx
        label = ""
        name = str(o["microbatch"]) if tl["vpp"] == 1 else f"{o['microbatch']}.{o['chunk']}"
        if width >= 6 * len(name) + 4 and box >= 11:
            label = _text(x(o["start"]) + width / 2, y + box / 2 + 4, name, "op", "middle")
        out.append(f'<g data-tip="{esc(_op_tip(o, tl["vpp"]))}">{rects}{label}</g>')
    for t in tl["transfers"]:
        y = top + t["dst"] * rh + 1 + box + 1
        out.append(_rect(x(t["start"]), y, (t["end"] - t["start"]) * sx, max(2.0, rh - box - 4), "k-p2p",
                         f"{t['what']} of micro-batch {t['microbatch']}: stage {t['src']} to stage {t['dst']}\n"
                         f"{seconds(t['end'] - t['start'])} on the link ({seconds(t['start'])} to "
                         f"{seconds(t['end'])}), not busy device time"))
    return out


def _aggregated(tl: dict, x, sx: float, top: float, rh: float, box: float) -> list[str]:
    """Each merged segment as a column stacked by the share of each kind (idle is the background)."""
    out = []
    for stage, segments in enumerate(tl["segments"]):
        y0 = top + stage * rh + 1
        for seg in segments:
            span = seg["end"] - seg["start"]
            secs = seg["seconds"]
            busy = [(k, secs.get(k, 0.0)) for k in STACK_ORDER if secs.get(k, 0.0) > 0]
            if not busy:
                continue
            rects, y = [], y0
            for kind, s in busy:
                h = box * s / span
                rects.append(_rect(x(seg["start"]), y, span * sx, h, f"k-{kind}"))
                y += h
            mbs = seg["microbatches"]
            tip = "\n".join([f"stage {stage}, {seconds(seg['start'])} to {seconds(seg['end'])}"
                             + (f": micro-batches {mbs[0]}-{mbs[1]}" if mbs else "")]
                            + [f"{KIND_LABELS[k]}: {seconds(s)} ({pct(s / span)})" for k, s in busy]
                            + [f"idle: {seconds(secs.get('idle', 0.0))} ({pct(secs.get('idle', 0.0) / span)})"])
            out.append(f'<g data-tip="{esc(tip)}">{"".join(rects)}</g>')
    return out


# ---------------------------------------------------------------------------------------------- memory
def memory_svg(mem: dict) -> str:
    """A stacked bar per stage (bytes by kind, the allocator margin on top), the usable and capacity lines,
    and each stage's peak phase."""
    stages = mem["stages"]
    n = len(stages)
    left, right, top, bottom = 70, 150, 16, 46
    pw, ph = WIDTH - left - right, 300
    ymax = max(mem["capacity_bytes"], max(s["reserved"] for s in stages)) * 1.05
    slot = pw / n
    bw = min(46.0, slot * 0.72)
    body = _y_axis(left, top, ph, pw, ymax, size)

    def y(b: float) -> float:
        return top + ph - ph * b / ymax

    label_every = max(1, round(n / 32))
    for k, s in enumerate(stages):
        x0 = left + slot * k + (slot - bw) / 2
        base, rects = 0.0, []
        for kind, b in list(s["parts"].items()) + [("margin", s["margin"])]:
            if b > 0:
                rects.append(_rect(x0, y(base + b), bw, y(base) - y(base + b), f"m-{kind}"))
                base += b
        tip = (f"stage {s['stage']} ({s['layers']} layers)" + ("" if s["fits"] else "  DOES NOT FIT") + "\n"
               + "\n".join(f"{MEMORY_LABELS[k]}: {size(v)}" for k, v in s["parts"].items())
               + f"\ntotal (max allocated): {size(s['total'])}\nreserved (+ margin): {size(s['reserved'])}"
               + f"\npeaks in: {s['peak_phase']}")
        hit = _rect(x0, y(ymax), bw, ph, "hit")
        body.append(f'<g data-tip="{esc(tip)}">{hit}{"".join(rects)}</g>')
        if k % label_every == 0:
            body.append(_text(x0 + bw / 2, top + ph + 14, str(s["stage"]), "tick", "middle"))
            if n <= 16:
                body.append(_text(x0 + bw / 2, top + ph + 28, s["peak_phase"], "tick", "middle"))
    apart = y(mem["usable_bytes"]) - y(mem["capacity_bytes"]) >= 12
    for value, cls, label, dy in ((mem["usable_bytes"], "usable", "usable", 4 if apart else 12),
                                  (mem["capacity_bytes"], "capacity", "capacity", 4 if apart else -4)):
        body.append(f'<line class="{cls}" x1="{left}" y1="{c(y(value))}" x2="{c(left + pw)}" y2="{c(y(value))}"/>')
        body.append(_text(left + pw + 6, y(value) + dy, f"{label} {size(value)}", "tick"))
    body.append(_text(left + pw / 2, top + ph + (42 if n <= 16 else 30),
                      "stage" + (" / phase of the peak" if n <= 16 else ""), "tick", "middle"))
    return _svg(WIDTH, top + ph + bottom, body, f"memory per GPU of each of {n} pipeline stages")


# ---------------------------------------------------------------------------------------------- step time
def breakdown_svg(bd: dict) -> str:
    """The step as one bar, split by part of the critical path."""
    left, pw, h = 8, WIDTH - 16, 34
    step = bd["step_time_s"]
    body, x = [], float(left)
    for part in bd["parts"]:
        if part["seconds"] <= 0:
            continue
        w = pw * part["seconds"] / step
        tip = f"{part['label']}: {seconds(part['seconds'])} ({pct(part['share'])} of the step)"
        body.append(_rect(x, 4, w, h, f"t-{part['key']}", tip))
        if w > 90:
            body.append(_text(x + 6, 4 + h / 2 + 4, f"{part['label']} {pct(part['share'])}", "op"))
        x += w
    return _svg(WIDTH, h + 8, body, "step time by part")


def stacked_bar(time: dict, scale_s: float, width: float = 260, height: float = 14) -> str:
    """A small bar of one configuration's step by part, on a shared scale (seconds at full width)."""
    body, x = [], 0.0
    for key, s in time.items():
        if s > 0:
            w = width * s / scale_s
            body.append(_rect(x, 0, w, height, f"t-{key}"))
            x += w
    return _svg(width, height, body, "step time by part")


# ---------------------------------------------------------------------------------------------- run
def bars_svg(items: list[dict], lines: list[tuple[float, str, str]], fmt, label: str,
             height: float = 220) -> str:
    """Vertical bars ({value, cls, tip, label, group}: bars of one group side by side) with horizontal
    reference lines (value, css class, text)."""
    groups: dict = {}
    for it in items:
        groups.setdefault(it["group"], []).append(it)
    n = len(groups)
    left, right, top, bottom = 70, 150, 12, 34
    pw = WIDTH - left - right
    values = [it["value"] for it in items if it["value"] is not None] + [v for v, _, _ in lines]
    ymax = max(values) * 1.1 if values and max(values) > 0 else 1.0
    slot = pw / max(n, 1)
    body = _y_axis(left, top, height, pw, ymax, fmt)

    def y(v: float) -> float:
        return top + height - height * v / ymax

    label_every = max(1, round(n / 32))
    for k, (group, its) in enumerate(groups.items()):
        bw = min(36.0, slot * 0.8 / len(its))
        x0 = left + slot * k + (slot - bw * len(its)) / 2
        for j, it in enumerate(its):
            if it["value"] is not None:
                body.append(_rect(x0 + j * bw, y(it["value"]), bw * 0.92, y(0) - y(it["value"]), it["cls"],
                                  it["tip"]))
        if k % label_every == 0:
            body.append(_text(left + slot * (k + 0.5), top + height + 14, str(group), "tick", "middle"))
    for value, cls, text in lines:
        body.append(f'<line class="{cls}" x1="{left}" y1="{c(y(value))}" x2="{c(left + pw)}" y2="{c(y(value))}"/>')
        body.append(_text(left + pw + 6, y(value) + 4, text, "tick"))
    body.append(_text(left + pw / 2, top + height + 30, "rank", "tick", "middle"))
    return _svg(WIDTH, top + height + bottom, body, label)


def loss_svg(points: list[dict], height: float = 220, max_markers: int = 300) -> str:
    """The loss per step as a line, hoverable points (at most `max_markers`, evenly spread)."""
    left, right, top, bottom = 70, 150, 12, 34
    pw = WIDTH - left - right
    if not points:
        return _svg(WIDTH, 40, [_text(left, 24, "no losses in the run report", "tick")], "loss curve")
    lo, hi = min(p["loss"] for p in points), max(p["loss"] for p in points)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    s0, s1 = points[0]["step"], points[-1]["step"]

    def x(step: int) -> float:
        return left + (pw * (step - s0) / (s1 - s0) if s1 > s0 else pw / 2)

    def y(v: float) -> float:
        return top + height - height * (v - lo) / (hi - lo)

    body = []
    for v in ticks(hi - lo, 5):
        body.append(f'<line class="grid" x1="{left}" y1="{c(y(lo + v))}" x2="{c(left + pw)}" y2="{c(y(lo + v))}"/>')
        body.append(_text(left - 6, y(lo + v) + 4, f"{lo + v:.3g}", "tick", "end"))
    for st in ticks(s1 - s0, 8) if s1 > s0 else [0]:
        body.append(_text(x(s0 + st), top + height + 14, f"{s0 + st:g}", "tick", "middle"))
    body.append('<polyline class="loss" points="' + " ".join(f"{c(x(p['step']))},{c(y(p['loss']))}"
                                                          for p in points) + '"/>')
    every = max(1, -(-len(points) // max_markers))
    for p in points[::every]:
        tip = f"step {p['step']}: loss {p['loss']:.5g}"
        body.append(f'<circle class="pt" cx="{c(x(p["step"]))}" cy="{c(y(p["loss"]))}" r="3.5" data-tip="{esc(tip)}"/>')
    body.append(_text(left + pw / 2, top + height + 30, "step", "tick", "middle"))
    return _svg(WIDTH, top + height + bottom, body, "loss per step")
