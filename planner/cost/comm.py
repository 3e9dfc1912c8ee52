"""Alpha-beta cost of collectives and point-to-point transfers on the links a group actually uses.

Ring collectives in nccl-tests' bus-bandwidth convention (Thakur et al. 2005; NCCL's PERFORMANCE.md):
all-reduce of M bytes over n ranks 2(n-1)a + 2(n-1)/n * M/b; all-gather / reduce-scatter (n-1)a + (n-1)/n * M/b.
An all-reduce spanning nodes runs hierarchically (tree-like): reduce-scatter inside each node, the inter-node
all-reduce on 1/g of the data, all-gather inside each node (g = the group's ranks per node). An all-gather or
reduce-scatter spanning nodes is NCCL's ring over all n ranks (one ring per NIC rail): its latency is that of
its hops, n - N over NVLink and N - 1 over the network for N nodes (NCCL's own ring model, ncclTopoTuneModel in
src/graph/tuning.cc), and it moves the data at the slower of NVLink and the node's NICs (g NICs' worth, or the
`rails` NICs an engine's flat ring is confined to). Across nodes
every GPU of a node communicates at once, so each gets its node's NIC bandwidth divided by the GPUs per node.
Every collective and transfer is at least one kernel launch (the GPU's `kernel_overhead_s`): small messages
hide under the host's issue time. A measured link matrix (from `meshplan profile cluster`) replaces the spec-sheet links: a flat ring over the
group's devices runs at the slowest measured pair on it times the link class's collective efficiency, and the
slowest of the parallel groups sets the time. Measured collective times, when the cluster file has them,
take precedence for the collectives they cover.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.specs import ClusterSpec


@dataclass(frozen=True)
class Group:
    """A communicator: the devices of one representative group of a parallel dimension and the nodes it spans;
    `peers` optionally lists every parallel group of the dimension (they run at once)."""

    ranks: tuple[int, ...]
    nodes: int
    peers: tuple[tuple[int, ...], ...] = ()

    @property
    def size(self) -> int:
        return len(self.ranks)

    @staticmethod
    def of(ranks: tuple[int, ...], gpus_per_node: int, peers: tuple[tuple[int, ...], ...] = ()) -> "Group":
        return Group(ranks, len({r // gpus_per_node for r in ranks}), peers)


def ring_time(op: str, n: int, nbytes: float, latency: float, bandwidth: float) -> float:
    """Seconds of a ring collective over n ranks (alpha-beta, bus-bandwidth convention)."""
    if n <= 1:
        return 0.0
    steps = 2 * (n - 1) if op == "all_reduce" else n - 1
    return steps * latency + steps / n * nbytes / bandwidth


class Network:
    """Link parameters of one cluster, resolved once."""

    def __init__(self, cluster: ClusterSpec):
        self.gpus_per_node = cluster.gpus_per_node
        intra, inter = cluster.intra_node, cluster.inter_node
        nic_share = cluster.nics_per_node / cluster.gpus_per_node      # NICs per GPU when every GPU sends
        self.intra_latency, self.inter_latency = intra.latency, inter.latency
        self.intra_bw, self.inter_bw = intra.effective_bandwidth, inter.effective_bandwidth * nic_share
        self.nic_bw = inter.effective_bandwidth                        # one NIC's collective bandwidth
        self.intra_p2p_bw, self.inter_p2p_bw = intra.bandwidth, inter.bandwidth * nic_share
        self.intra_eff, self.inter_eff = intra.efficiency, inter.efficiency
        self.matrix = cluster.link_matrix
        self.floor = cluster.gpu.efficiency.kernel_overhead_s
        self.table = _CollectiveTable(cluster.collectives) if cluster.collectives else None

    def collective(self, op: str, nbytes: float, group: Group, rails: int = 0) -> float:
        """Seconds for one collective of a `nbytes` buffer over `group` (the slowest of its peers); `rails`: the NICs
        per node an all-gather or reduce-scatter spanning nodes may use (0: all)."""
        if group.size <= 1 or nbytes <= 0:
            return 0.0
        return max(self.floor, self._collective(op, nbytes, group, rails))

    def _collective(self, op: str, nbytes: float, group: Group, rails: int = 0) -> float:
        n = group.size
        if op == "all_to_all":
            return self._all_to_all(nbytes, group)
        if self.table is not None:
            measured = self.table.time(op, nbytes, group)
            if measured is not None:
                return measured
        if self.matrix is not None:
            eff = self.intra_eff if group.nodes == 1 else self.inter_eff
            return max(self._measured_ring(op, nbytes, ranks, eff) for ranks in (group.peers or (group.ranks,)))
        if group.nodes == 1:
            return ring_time(op, n, nbytes, self.intra_latency, self.intra_bw)
        local = n // group.nodes
        inter = ring_time(op, group.nodes, nbytes / local, self.inter_latency, self.inter_bw)
        if local == 1:
            return inter
        if op != "all_reduce":
            # NCCL's ring over every rank, one ring per NIC rail: n - N NVLink hops and N - 1 network hops, the data
            # moving at the slower of NVLink and the node's NICs
            nics = local * self.inter_bw if not rails else min(local * self.inter_bw, rails * self.nic_bw)
            hops = (n - group.nodes) * self.intra_latency + (group.nodes - 1) * self.inter_latency
            return hops + (n - 1) / n * nbytes / min(self.intra_bw, nics)
        if op == "all_reduce":
            intra = (ring_time("reduce_scatter", local, nbytes, self.intra_latency, self.intra_bw)
                     + ring_time("all_gather", local, nbytes, self.intra_latency, self.intra_bw))
        else:
            intra = ring_time(op, local, nbytes, self.intra_latency, self.intra_bw)
        return intra + inter

    def _all_to_all(self, nbytes: float, group: Group) -> float:
        """All-to-all of `nbytes` per rank (its whole send buffer, 1/n of it to each rank): pairwise exchange,
        (n-1) latencies and the bytes leaving the rank (Thakur, Rabenseifner & Gropp 2005), the part for ranks in
        the same node over NVLink and the part for other nodes over the rank's NIC share at the same time."""
        n, nodes = group.size, group.nodes
        if self.matrix is not None:
            pairs = [(a, b) for ranks in (group.peers or (group.ranks,)) for a in ranks for b in ranks if a != b]
            eff = self.intra_eff if nodes == 1 else self.inter_eff
            bandwidth = min(self.matrix.bandwidth[a][b] for a, b in pairs) * eff
            return (n - 1) * max(self.matrix.latency[a][b] for a, b in pairs) + (n - 1) / n * nbytes / bandwidth
        local = n // nodes
        intra = (local - 1) / n * nbytes / self.intra_bw
        if nodes == 1:
            return (n - 1) * self.intra_latency + intra
        inter = (n - local) / n * nbytes / self.inter_bw
        return (local - 1) * self.intra_latency + (n - local) * self.inter_latency + max(intra, inter)

    def p2p(self, nbytes: float, src: int, dst: int) -> float:
        """Seconds to send `nbytes` from device src to device dst (a point-to-point transfer runs at the link's
        own bandwidth; only collectives pay the ring efficiency)."""
        if nbytes <= 0 or src == dst:
            return 0.0
        if self.matrix is not None:
            t = self.matrix.latency[src][dst] + nbytes / self.matrix.bandwidth[src][dst]
        elif src // self.gpus_per_node == dst // self.gpus_per_node:
            t = self.intra_latency + nbytes / self.intra_p2p_bw
        else:
            t = self.inter_latency + nbytes / self.inter_p2p_bw
        return max(self.floor, t)

    def _measured_ring(self, op: str, nbytes: float, ranks: tuple[int, ...], efficiency: float) -> float:
        n = len(ranks)
        pairs = [(ranks[i], ranks[(i + 1) % n]) for i in range(n)]
        bandwidth = min(self.matrix.bandwidth[a][b] for a, b in pairs) * efficiency
        latency = max(self.matrix.latency[a][b] for a, b in pairs)
        return ring_time(op, n, nbytes, latency, bandwidth)


class _CollectiveTable:
    """Measured collective times (`meshplan profile cluster`), fitted per (op, group size, contiguity) to
    t = a + M * b by least squares of the relative error over the measured message sizes. A group size that was not measured
    scales the nearest measured one by the ring's step counts: a by (n-1), b by (n-1)/n."""

    def __init__(self, rows):
        points: dict[tuple[str, int, bool], list[tuple[float, float]]] = {}
        for r in rows:
            points.setdefault((r.op, r.group_size, r.contiguous), []).append((float(r.message_bytes), r.time_s))
        self.fits = {key: _fit_affine(pts) for key, pts in points.items()}

    def time(self, op: str, nbytes: float, group: Group) -> float | None:
        ranks = sorted(group.ranks)
        contiguous = ranks[-1] - ranks[0] == len(ranks) - 1
        options = [k for k in self.fits if k[0] == op and k[2] == contiguous] or \
                  [k for k in self.fits if k[0] == op]
        if not options:
            return None
        n = group.size
        key = min(options, key=lambda k: (abs(k[1] - n), -k[1]))
        a, b = self.fits[key]
        m = key[1]
        if m != n and m > 1:
            a *= (n - 1) / (m - 1)
            b *= ((n - 1) / n) / ((m - 1) / m)
        return a + nbytes * b


def _fit_affine(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) >= 0 of t = a + M b through the points (one point: all of it bandwidth), least squares on the
    relative error, so that a small message's latency weighs as much as a large one's bandwidth (scipy's NNLS on
    rows (1/t, M/t) against 1)."""
    if len(points) == 1:
        size, t = points[0]
        return 0.0, t / size
    from scipy.optimize import nnls   # here: only measured clusters need it
    rows = [(1.0 / t, m / t) for m, t in points]
    scale = max(m for m, _ in points)   # M in units of the largest message, for a well-conditioned solve
    (a, b_scaled), _ = nnls([[r0, r1 / scale] for r0, r1 in rows], [1.0] * len(rows))
    return float(a), float(b_scaled / scale)
