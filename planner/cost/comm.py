"""Alpha-beta cost of collectives and point-to-point transfers on the links a group actually uses.

Ring collectives in nccl-tests' bus-bandwidth convention (Thakur et al. 2005; NCCL's PERFORMANCE.md):
all-reduce of M bytes over n ranks 2(n-1)a + 2(n-1)/n * M/b; all-gather / reduce-scatter (n-1)a + (n-1)/n * M/b.
A group spanning nodes runs hierarchically: reduce-scatter inside each node, the inter-node collective on
1/g of the data, all-gather inside each node (g = the group's ranks per node). Across nodes every GPU of
a node communicates at once, so each gets its node's NIC bandwidth divided by the GPUs per node.
Every collective and transfer is at least one kernel launch (the GPU's `kernel_overhead_s`): small messages
hide under the host's issue time. A measured link matrix (from `meshplan profile cluster`) replaces the spec-sheet links: a flat ring over the
group's devices runs at the slowest measured pair on it, and the slowest of the parallel groups sets the time.
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
        self.intra_latency = cluster.intra_node.latency
        self.intra_bw = cluster.intra_node.effective_bandwidth
        self.inter_latency = cluster.inter_node.latency
        self.inter_bw = cluster.nics_per_node * cluster.inter_node.effective_bandwidth / cluster.gpus_per_node
        self.matrix = cluster.link_matrix
        self.floor = cluster.gpu.efficiency.kernel_overhead_s

    def collective(self, op: str, nbytes: float, group: Group) -> float:
        """Seconds for one collective of a `nbytes` buffer over `group`."""
        if group.size <= 1 or nbytes <= 0:
            return 0.0
        return max(self.floor, self._collective(op, nbytes, group))

    def _collective(self, op: str, nbytes: float, group: Group) -> float:
        n = group.size
        if self.matrix is not None:
            return max(self._measured_ring(op, nbytes, ranks) for ranks in (group.peers or (group.ranks,)))
        if group.nodes == 1:
            return ring_time(op, n, nbytes, self.intra_latency, self.intra_bw)
        local = n // group.nodes
        inter = ring_time(op, group.nodes, nbytes / local, self.inter_latency, self.inter_bw)
        if local == 1:
            return inter
        if op == "all_reduce":
            intra = (ring_time("reduce_scatter", local, nbytes, self.intra_latency, self.intra_bw)
                     + ring_time("all_gather", local, nbytes, self.intra_latency, self.intra_bw))
        else:
            intra = ring_time(op, local, nbytes, self.intra_latency, self.intra_bw)
        return intra + inter

    def p2p(self, nbytes: float, src: int, dst: int) -> float:
        """Seconds to send `nbytes` from rank src to rank dst."""
        if nbytes <= 0 or src == dst:
            return 0.0
        if self.matrix is not None:
            t = self.matrix.latency[src][dst] + nbytes / self.matrix.bandwidth[src][dst]
        elif src // self.gpus_per_node == dst // self.gpus_per_node:
            t = self.intra_latency + nbytes / self.intra_bw
        else:
            t = self.inter_latency + nbytes / self.inter_bw
        return max(self.floor, t)

    def _measured_ring(self, op: str, nbytes: float, ranks: tuple[int, ...]) -> float:
        n = len(ranks)
        pairs = [(ranks[i], ranks[(i + 1) % n]) for i in range(n)]
        bandwidth = min(self.matrix.bandwidth[a][b] for a, b in pairs)
        latency = max(self.matrix.latency[a][b] for a, b in pairs)
        return ring_time(op, n, nbytes, latency, bandwidth)
