"""The node groups of a cluster as homogeneous sub-clusters, and the links between them.

Each group becomes a plain one-group ClusterSpec (its GPU type, node count, intra-node link and NICs), so the
homogeneous cost model prices everything that stays inside a group: TP inside a node, DP over one stage's
GPUs, pipeline hops between stages on the same group. What crosses groups is priced here:
- a measured link matrix (`meshplan profile cluster`) wins: each group gets its block of the matrix, and
  transfers between groups run at the measured pair's latency and bandwidth;
- else a `group_links` entry: per-node bandwidth over its oversubscription, shared by the node's GPUs that
  send at once;
- else the slower of the two groups' NICs (one fabric), or, with a leaf/spine `topology`, the bottleneck of
  the switch path between two nodes (networkx); a group whose nodes span leaves has its inter-node NIC
  bandwidth cut to that bottleneck too (a ring is as slow as its slowest hop).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from planner.cost.comm import ring_time
from planner.specs import ClusterSpec, LinkMatrix, LinkSpec, NodeGroup


@dataclass(frozen=True)
class PlacedGroup:
    """One node group: where its GPUs sit in the cluster's device numbering and its homogeneous sub-cluster."""

    index: int
    name: str
    gpu_type: str
    nodes: int
    gpus_per_node: int
    first_node: int          # global index of its first node
    first_device: int        # global index of its first GPU (groups are numbered in listing order)
    cluster: ClusterSpec     # the group alone, as a homogeneous cluster

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_bandwidth(self) -> float:
        """Bytes/s one node sends across nodes (all its NICs), one direction."""
        return self.cluster.inter_node.bandwidth * self.cluster.nics_per_node


def node_groups(cluster: ClusterSpec) -> list[PlacedGroup]:
    """The cluster's node groups in listing (rank) order, each with its sub-cluster."""
    fabric = _Fabric(cluster)
    out, node, device = [], 0, 0
    for i, g in enumerate(cluster.groups_raw()):
        sub = cluster if not cluster.heterogeneous else _sub_cluster(cluster, g, device, fabric, node)
        out.append(PlacedGroup(i, g.name, g.gpu_type, g.count, g.gpus_per_node, node, device, sub))
        node += g.count
        device += g.count * g.gpus_per_node
    return out


def _sub_cluster(cluster: ClusterSpec, g: NodeGroup, first_device: int, fabric: "_Fabric",
                 first_node: int) -> ClusterSpec:
    intra = g.intra_node or cluster.intra_node
    inter = g.inter_node or cluster.inter_node
    nics = g.nics_per_node or cluster.nics_per_node
    slow = fabric.spread_factor(first_node, g.count)
    if slow < 1.0:
        inter = inter.model_copy(update={"bandwidth": inter.bandwidth * slow})
    matrix = None
    if cluster.link_matrix is not None:
        lo, hi = first_device, first_device + g.count * g.gpus_per_node
        m = cluster.link_matrix
        matrix = LinkMatrix(world_size=hi - lo, bandwidth=[row[lo:hi] for row in m.bandwidth[lo:hi]],
                            latency=[row[lo:hi] for row in m.latency[lo:hi]])
    return ClusterSpec(
        name=f"{cluster.name}/{g.name}", description=f"node group {g.name} of {cluster.name}", backend=cluster.backend,
        gpu_types={g.gpu_type: cluster.gpu_types[g.gpu_type]},
        nodes=NodeGroup(name=g.name, count=g.count, gpus_per_node=g.gpus_per_node, gpu_type=g.gpu_type),
        intra_node=intra, inter_node=inter, nics_per_node=nics, overlap_slowdown=cluster.overlap_slowdown,
        link_matrix=matrix, measured=cluster.measured, engine_overrides=cluster.engine_overrides)


class _Fabric:
    """Node-to-node bandwidth of a leaf/spine topology: nodes in listing order under leaves of
    `nodes_per_leaf`, every leaf joined to one spine layer whose uplink carries the leaf's nodes' bandwidth
    over `oversubscription`. With every node sending at once, a path's per-node share is the smallest of its
    edges' capacity over the nodes behind that edge."""

    def __init__(self, cluster: ClusterSpec):
        self.topology = cluster.topology
        self.graph = None
        if self.topology is None:
            return
        per = self.topology.nodes_per_leaf
        graph = nx.Graph()
        n = cluster.num_nodes
        leaves = -(-n // per)
        for leaf in range(leaves):
            behind = min(per, n - leaf * per)
            graph.add_edge(("leaf", leaf), "spine", share=1.0 / self.topology.oversubscription, users=behind)
        for node in range(n):
            graph.add_edge(("node", node), ("leaf", node // per), share=1.0, users=1)
        self.graph = graph

    def factor(self, a: int, b: int) -> float:
        """The fraction of a node's own bandwidth that reaches from node a to node b when every node sends."""
        if self.graph is None or a == b:
            return 1.0
        path = nx.shortest_path(self.graph, ("node", a), ("node", b))
        return min(self.graph.edges[u, v]["share"] for u, v in zip(path, path[1:]))

    def spread_factor(self, first_node: int, count: int) -> float:
        """The slowest node pair of a run of nodes (a ring through all of them crosses its worst hop)."""
        if self.graph is None or count == 1:
            return 1.0
        return min(self.factor(first_node, first_node + j) for j in range(1, count))


class GroupLinks:
    """Transfers and two-rank all-reduces between GPUs of different groups."""

    def __init__(self, cluster: ClusterSpec, groups: list[PlacedGroup]):
        self.cluster, self.groups = cluster, groups
        self.matrix = cluster.link_matrix
        self.fabric = _Fabric(cluster)
        self.links = {frozenset(link.between): link for link in cluster.group_links}

    def link(self, a: int, b: int) -> LinkSpec:
        """Per-node link between groups a and b (bandwidth already over oversubscription)."""
        ga, gb = self.groups[a], self.groups[b]
        explicit = self.links.get(frozenset((ga.name, gb.name)))
        if explicit is not None:
            return LinkSpec(bandwidth=explicit.bandwidth / explicit.oversubscription, latency=explicit.latency,
                            efficiency=explicit.efficiency)
        slower = min((ga, gb), key=lambda g: g.node_bandwidth)
        nic = slower.cluster.inter_node
        share = self.fabric.factor(ga.first_node, gb.first_node)
        return LinkSpec(bandwidth=slower.node_bandwidth * share, latency=max(ga.cluster.inter_node.latency,
                                                                             gb.cluster.inter_node.latency),
                        efficiency=nic.efficiency)

    def p2p(self, nbytes: float, src: int, dst: int, senders_per_node: int) -> float:
        """Seconds to send `nbytes` from global device src (in one group) to dst (in another) while
        `senders_per_node` GPUs of each node send at once."""
        if self.matrix is not None:
            return self.matrix.latency[src][dst] + nbytes / self.matrix.bandwidth[src][dst]
        link = self.link(self.group_of(src), self.group_of(dst))
        return link.latency + nbytes * senders_per_node / link.bandwidth

    def all_reduce(self, nbytes: float, a: int, b: int, senders_per_node: int) -> float:
        """A ring all-reduce of `nbytes` between global devices a and b of different groups."""
        if self.matrix is not None:
            bw = min(self.matrix.bandwidth[a][b], self.matrix.bandwidth[b][a])
            return ring_time("all_reduce", 2, nbytes, max(self.matrix.latency[a][b], self.matrix.latency[b][a]), bw)
        link = self.link(self.group_of(a), self.group_of(b))
        return ring_time("all_reduce", 2, nbytes, link.latency,
                         link.effective_bandwidth / senders_per_node)

    def group_of(self, device: int) -> int:
        for g in self.groups:
            if g.first_device <= device < g.first_device + g.gpus:
                return g.index
        raise IndexError(device)


def used_groups_cluster(cluster: ClusterSpec, used: tuple[int, ...]) -> ClusterSpec | None:
    """The cluster cut to the node groups `used` (listing order kept, links between them kept), for a plan that
    leaves the others idle; None with a topology or a measured link matrix, whose numbers follow the node and
    device numbering of the whole cluster."""
    if cluster.topology is not None or cluster.link_matrix is not None:
        return None
    groups = [g for i, g in enumerate(cluster.groups_raw()) if i in used]
    names = {g.name for g in groups}
    links = [link for link in cluster.group_links if set(link.between) <= names]
    return cluster.model_copy(update={"name": f"{cluster.name} ({', '.join(sorted(names))})", "node_groups": groups,
                                      "group_links": links,
                                      "gpu_types": {g.gpu_type: cluster.gpu_types[g.gpu_type] for g in groups}})
