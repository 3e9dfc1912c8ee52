"""Turn the raw measurements of `profile cluster` into a `ClusterSpec` the planner reads (no torch).

Choices (see docs/profiler.md):
* Devices are grouped by name; each name becomes one `GPUSpec` fitted from the medians over its ranks.
  `nodes.gpu_type` is the slowest type (synchronous training runs at the pace of the slowest device).
* Peaks: for a GPU whose name matches a built-in cluster spec, the spec sheet's peak FLOP/s and memory
  bandwidth are kept and the fit gives the efficiencies (gemm_max = fitted asymptotic GEMM rate / peak).
  For any other device (a CPU) only the product peak * gemm_max is observable; the file then sets the
  peak of the main dtype to the fitted asymptotic rate A (the rate of an arbitrarily large GEMM) and
  gemm_max = 1, and the peak of every other measured dtype from its GEMM rate divided by the fitted shape
  factor. Memory bandwidth is the measured copy bandwidth and `efficiency.memory` the elementwise
  (out-of-place add) bandwidth relative to it.
* Links: every ordered pair's latency and bandwidth from an alpha-beta fit. `intra_node` / `inter_node`
  are the medians over the pairs inside / across nodes; their `efficiency` is the bus bandwidth of the
  largest all-reduce over a whole node (over all ranks, for inter_node) divided by that median. On one
  node there are no inter-node pairs: inter_node is a copy of intra_node and the description says so.
  nics_per_node is set to the devices per node, so inter_node.bandwidth is one device's share of the
  node's network as measured with all pairs of a round busy.
* Host: the seconds per forward and backward kernel of eager PyTorch and of the optimizer step per plain and
  per DTensor parameter tensor (profiler/host.py), medians over the ranks, go to `engine_overrides` of the
  engines that run eager PyTorch (HOST_ENGINES), replacing the engine files' figures of another host.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from planner.cost.kernels import shape_efficiency
from planner.specs import ClusterSpec
from profiler.fit import bus_bandwidth, fit_alpha_beta, fit_gemm, overlap_slowdown

HOST_FIGURES = ("per_kernel_s", "per_backward_kernel_s", "optimizer_per_tensor_s", "optimizer_per_dtensor_s",
                "checkpoint_forward_s", "recompute_kernel_factor")
HOST_ENGINES = ("meshplan", "torchtitan")   # eager PyTorch, the runtime's stack: the measured host figures apply
CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster_specs"


def spec_sheet(name: str) -> dict | None:
    """The built-in GPUSpec (as a dict) of a device with exactly this name, if any cluster spec has one."""
    import yaml
    for path in sorted(CLUSTER_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for gpu in (data.get("gpu_types") or {}).values():
            if gpu.get("name") == name and not name.startswith("x86"):
                return gpu
    return None


def _slug(name: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in name)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") or "device"


def attention_fit(devs: list[dict]) -> tuple[float, float]:
    """(R, d0) of fused attention's rate R * d / (d + d0) (FLOP/s; d the head dimension) from the median rates at
    the two head dimensions measured (one: d0 = 0, R the measured rate). Two points fix both:
    d0 = (r1 - r2) / (r2 / d2 - r1 / d1), r_i the rate at d_i."""
    def rate(key: str) -> float:
        return statistics.median(d[key]["flops"] / d[key]["time_s"] for d in devs)
    r1, d1 = rate("attention"), devs[0]["attention"]["shape"][3]
    if "attention_narrow" not in devs[0]:
        return r1, 0.0
    r2, d2 = rate("attention_narrow"), devs[0]["attention_narrow"]["shape"][3]
    if d2 >= d1 or not r1 * d2 / d1 < r2 < r1:   # no slower at narrower heads, or slower than d itself: no fit
        return r1, 0.0
    d0 = (r1 - r2) / (r2 / d2 - r1 / d1)
    return r1 * (d1 + d0) / d1, d0


def fit_device(devs: list[dict]) -> tuple[dict, dict]:
    """A GPUSpec dict from the measurements of the ranks with one device name, and the fit's details."""
    first = devs[0]
    main = first["main_dtype"]
    overhead = statistics.median(d["memory"]["kernel_overhead_s"] for d in devs)
    by_shape: dict[tuple, list[float]] = defaultdict(list)
    for d in devs:
        for g in d["gemm"]:
            by_shape[(g["dtype"], *g["shape"])].append(g["time_s"])
    med = {k: statistics.median(v) for k, v in by_shape.items()}
    main_pts = [(k[1:], t) for k, t in med.items() if k[0] == main]
    fit = fit_gemm([s for s, _ in main_pts], [t for _, t in main_pts], overhead)
    copy_bw = statistics.median(d["memory"]["copy_bandwidth"] for d in devs)
    elem_bw = statistics.median(d["memory"]["elementwise_bandwidth"] for d in devs)

    sheet = spec_sheet(first["name"]) if first["type"] == "cuda" else None
    if sheet is not None:
        peaks = dict(sheet["peak_flops"])
        gemm_max = min(1.0, fit.rate / peaks.get(main, peaks["fp32"]))
        hbm = float(sheet["hbm_bandwidth"])
    else:
        gemm_max = 1.0
        peaks = {main: fit.rate}
        hbm = copy_bw
    for (dtype, m, n, k), t in sorted(med.items()):
        if dtype == main or (sheet is not None and dtype in peaks):
            continue
        rate = 2.0 * m * n * k / t
        peaks[dtype] = max(peaks.get(dtype, 0.0), rate / (gemm_max * shape_efficiency((m, n, k), fit.tile)))
    if "fp32" not in peaks:
        peaks["fp32"] = peaks[main]
    att = [d["attention"] for d in devs]
    att_rate, head_dim = attention_fit(devs)
    att_peak = peaks.get(att[0]["dtype"], peaks["fp32"])
    gpu = {
        "name": first["name"],
        "memory_bytes": int(min(d["memory_bytes"] for d in devs)),
        "peak_flops": {k: float(v) for k, v in sorted(peaks.items())},
        "hbm_bandwidth": float(hbm),
        "efficiency": {
            "gemm_max": float(gemm_max),
            "gemm_tile": float(fit.tile),
            "flash_attention": float(min(1.0, max(1e-3, att_rate / att_peak))),
            "attention_head_dim": float(head_dim),
            "memory": float(min(1.0, max(1e-3, elem_bw / hbm))),
            "kernel_overhead_s": float(overhead),
        },
        "runtime_reserved_bytes": int(max(d["runtime_reserved_bytes"] for d in devs)),
        "allocator_margin": 0.05 if first["type"] == "cuda" else 0.0,
        "async_launch": first["type"] == "cuda",      # a CPU runs the ops it issues: host and op times add
    }
    details = {"gemm_rate": fit.rate, "gemm_tile": fit.tile, "gemm_fit_rms_log_error": fit.rms_log_error,
               "gemm_points": fit.points, "copy_bandwidth": copy_bw, "elementwise_bandwidth": elem_bw,
               "ranks": len(devs), "spec_sheet": sheet is not None}
    return gpu, details


def link_matrix(world: int, sizes: list[int], links: dict[str, dict[str, list[float]]]) -> tuple[list, list]:
    """Bandwidth (bytes/s) and latency (s) matrices from each direction's round-trip times per size."""
    bw = [[0.0] * world for _ in range(world)]
    lat = [[0.0] * world for _ in range(world)]
    seen = set()
    for round_data in links.values():
        for key, times in round_data.items():
            src, dst = (int(x) for x in key.split("->"))
            ab = fit_alpha_beta(sizes, times)
            bw[src][dst], lat[src][dst] = ab.bandwidth, ab.latency_s
            seen.add((src, dst))
    missing = [(i, j) for i in range(world) for j in range(world) if i != j and (i, j) not in seen]
    if missing:
        raise ValueError(f"link measurements missing for {len(missing)} ordered pairs, e.g. {missing[0]}")
    return bw, lat


def _median_link(bw, lat, pairs) -> tuple[float, float] | None:
    if not pairs:
        return None
    return (statistics.median(bw[i][j] for i, j in pairs), statistics.median(lat[i][j] for i, j in pairs))


def host_overrides(devices: list[dict]) -> dict[str, dict[str, float]]:
    """The eager engines' host seconds per kernel on this cluster (profiler/host.py), the median over the ranks
    (none when the raw profile predates that measurement)."""
    issue = [d["host_issue"] for d in devices if "host_issue" in d]
    if not issue:
        return {}
    values = {f"host.{key}": float(statistics.median(i[key] for i in issue))
              for key in HOST_FIGURES if all(key in i for i in issue)}
    return {engine: dict(values) for engine in HOST_ENGINES}


def summarize(raw: dict, name: str | None = None) -> tuple[ClusterSpec, dict]:
    """The ClusterSpec of a complete raw profile (see profiler.io for the raw layout), and the details of
    each device type's fit (asymptotic GEMM rate, tile, fit error, bandwidths) for the run's summary."""
    cfg = raw["config"]
    world, gpn = cfg["world_size"], cfg["gpus_per_node"]
    nodes = world // gpn
    devices = [raw["devices"][str(r)] for r in range(world)]

    by_name: dict[str, list[dict]] = defaultdict(list)
    for d in devices:
        by_name[d["name"]].append(d)
    gpu_types, details = {}, {}
    for dev_name, devs in by_name.items():
        key = _slug(dev_name)
        gpu_types[key], details[key] = fit_device(devs)
    main = devices[0]["main_dtype"]

    def gemm_rate(key: str) -> float:
        g = gpu_types[key]
        return g["peak_flops"].get(main, g["peak_flops"]["fp32"]) * g["efficiency"]["gemm_max"]
    slowest = min(gpu_types, key=gemm_rate)

    bw, lat = link_matrix(world, cfg["p2p_sizes"], raw["links"])
    node_of = [r // gpn for r in range(world)]
    intra_pairs = [(i, j) for i in range(world) for j in range(world) if i != j and node_of[i] == node_of[j]]
    inter_pairs = [(i, j) for i in range(world) for j in range(world) if node_of[i] != node_of[j]]

    colls = []
    for c in raw["collectives"]:
        colls.append({"op": c["op"], "group_size": c["group_size"], "contiguous": c["contiguous"],
                      "message_bytes": c["message_bytes"], "time_s": c["time_s"],
                      "bus_bandwidth": bus_bandwidth(c["op"], c["group_size"], c["message_bytes"], c["time_s"])})

    def allreduce_busbw(group_size: int) -> float | None:
        rows = [c for c in colls if c["op"] == "all_reduce" and c["group_size"] == group_size and c["contiguous"]]
        return max(rows, key=lambda c: c["message_bytes"])["bus_bandwidth"] if rows else None

    notes = []
    blocks = [{devices[r]["host"] for r in range(n * gpn, (n + 1) * gpn)} for n in range(nodes)]
    if any(len(b) != 1 for b in blocks) or len(set().union(*blocks)) != nodes:
        notes.append("ranks are not numbered node by node (rank // gpus_per_node is not the host): intra/inter "
                     "link summaries follow rank order")
    intra = _median_link(bw, lat, intra_pairs)
    inter = _median_link(bw, lat, inter_pairs)
    if intra is None:    # one device per node: the only links are across nodes
        intra = inter
        notes.append("one device per node: intra_node copied from the inter-node links")
    if inter is None:
        inter = intra
        notes.append("single node: inter_node copied from the measured intra-node links (no NIC measured)")

    def link(values: tuple[float, float], busbw: float | None) -> dict:
        eff = 1.0 if busbw is None else min(1.0, max(1e-3, busbw / values[0]))
        return {"bandwidth": float(values[0]), "latency": float(values[1]), "efficiency": float(eff)}

    intra_link = link(intra, allreduce_busbw(gpn) if gpn > 1 else None)
    inter_link = link(inter, allreduce_busbw(world)) if nodes > 1 else dict(intra_link)

    kappas = [overlap_slowdown(o["compute_s"], o["comm_s"], o["both_s"]) for o in raw.get("overlap", [])]
    hosts = sorted({d["host"] for d in devices})
    when = raw.get("finished") or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    desc = (f"measured by `meshplan profile cluster` on {', '.join(hosts[:4])}{' ...' if len(hosts) > 4 else ''}"
            f" at {when}: {nodes} node(s) x {gpn} {devices[0]['type']} device(s), backend {cfg['backend']}")
    if notes:
        desc += "; " + "; ".join(notes)
    spec = {
        "name": name or f"measured-{_slug(hosts[0])}-{world}",
        "description": desc,
        "backend": cfg["backend"],
        "gpu_types": gpu_types,
        "nodes": {"count": nodes, "gpus_per_node": gpn, "gpu_type": slowest},
        "intra_node": intra_link,
        "inter_node": inter_link,
        "nics_per_node": gpn,
        "overlap_slowdown": float(statistics.median(kappas)) if kappas else 0.1,
        "link_matrix": {"world_size": world, "bandwidth": bw, "latency": lat},
        "collectives": colls,
        "measured": True,
        "engine_overrides": host_overrides(devices),
    }
    return ClusterSpec.model_validate(spec), details
