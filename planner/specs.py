"""Validated input specs: the model, the cluster, the training setup and one parallel configuration.

Units everywhere: bytes, seconds, FLOP/s, bytes/s. Every spec is a pydantic model; the JSON schema of
each is what `model_json_schema()` returns (written out by `meshplan schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from planner.parallel_dims import ParallelDims

Precision = Literal["bf16", "fp16", "amp-bf16", "fp32"]
Optimizer = Literal["adam", "adamw", "sgd"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved"]


class _Spec(BaseModel):
    # defer_build: each schema is built on first use, so commands start faster
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class MoESpec(_Spec):
    """Mixture-of-experts MLPs (Mixtral, Qwen-MoE, Llama 4 style): which layers route, to how many experts."""

    num_experts: PositiveInt = Field(description="Routed experts E per MoE layer.")
    top_k: PositiveInt = Field(description="Experts each token is routed to (k).")
    expert_ffn_size: PositiveInt = Field(description="MLP width f_e of one routed expert.")
    shared_experts: int = Field(0, ge=0, description="Shared experts every token passes through (S).")
    shared_ffn_size: PositiveInt | None = Field(
        None, description="MLP width of one shared expert; defaults to expert_ffn_size.")
    shared_expert_gate: bool = Field(False, description="A sigmoid gate (h weights) scales the shared experts "
                                                        "(Qwen2-MoE).")
    first_dense_layers: int = Field(0, ge=0, description="The first k layers keep a dense MLP (ffn_hidden_size).")
    every: PositiveInt = Field(1, description="After those, layer i (from 0) is MoE when (i + 1) % every == 0, "
                                              "dense otherwise (Qwen2-MoE decoder_sparse_step, Llama 4 "
                                              "interleave_moe_layer_step).")
    router: Literal["softmax", "sigmoid"] = Field("softmax", description="Router scores (h*E weights, no bias).")
    capacity_factor: PositiveFloat | None = Field(
        None, description="Tokens an expert takes, as a multiple of the mean; beyond it tokens are dropped. "
                          "None: dropless (every routed token is computed).")

    @model_validator(mode="after")
    def _check(self) -> "MoESpec":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        return self

    @property
    def shared_width(self) -> int:
        """MLP width of all shared experts together (0 without any)."""
        return self.shared_experts * (self.shared_ffn_size or self.expert_ffn_size)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense_layers and (i + 1) % self.every == 0


class MLASpec(_Spec):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 Sec. 2.1; DeepSeek-V3, arXiv:2412.19437
    Sec. 2.1, eqs. 1-11): queries through a low-rank q_lora_rank bottleneck (normed), keys and values from one
    kv_lora_rank latent (normed) per token, each head's key a nope part from the latent and a rope part
    shared by all heads (the decoupled RoPE key, projected from the hidden state)."""

    kv_lora_rank: PositiveInt = Field(description="Width d_c of the compressed key/value latent.")
    q_lora_rank: PositiveInt | None = Field(
        None, description="Width d_c' of the compressed query; None: queries projected directly from the hidden "
                          "state (DeepSeek-V2-Lite).")
    qk_nope_head_dim: PositiveInt = Field(description="Per-head query/key channels without RoPE (d_h).")
    qk_rope_head_dim: PositiveInt = Field(description="Per-head query/key channels with RoPE (d_h^R); the rope key "
                                                      "is one per token, shared by the heads.")
    v_head_dim: PositiveInt = Field(description="Per-head value channels (and the output projection's input per "
                                                "head).")

    @model_validator(mode="after")
    def _check(self) -> "MLASpec":
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of channels: qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        return self

    @property
    def qk_head_dim(self) -> int:
        """Channels per head a score is taken over: nope + rope."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class ModelSpec(_Spec):
    """A decoder-only transformer (GPT-2 / GPT-3, Llama, Gemma or mixture-of-experts style)."""

    name: str = Field("custom", description="Display name.")
    num_layers: PositiveInt = Field(description="Transformer blocks.")
    hidden_size: PositiveInt = Field(description="Model width h.")
    num_heads: PositiveInt = Field(description="Attention (query) heads a.")
    num_kv_heads: PositiveInt | None = Field(
        None, description="Key/value heads k (grouped-query attention); defaults to num_heads.")
    ffn_hidden_size: PositiveInt | None = Field(
        None, description="MLP width f; defaults to 4h (gelu) or Llama's 2/3*4h rounded to 256 (swiglu).")
    vocab_size: PositiveInt = Field(description="Vocabulary size V.")
    max_position_embeddings: PositiveInt = Field(2048, description="Longest sequence the positions allow.")
    tied_embeddings: bool = Field(True, description="LM head shares the input embedding matrix.")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu", "geglu"] = Field(
        "gelu", description="gelu: two matrices; swiglu / geglu: gated (gate, up, down), SiLU or GELU gate.")
    head_dim: PositiveInt | None = Field(
        None, description="Width of one query/key/value head, independent of hidden_size / num_heads (Qwen3, "
                          "Gemma); default hidden_size / num_heads.")
    qk_norm: Literal["none", "rmsnorm", "l2"] = Field(
        "none", description="Norm over each query and key head (Qwen3, Gemma 3: RMSNorm with head_dim weights "
                            "each; Llama 4: weightless L2).")
    sandwich_norm: bool = Field(False, description="Norms after attention and after the MLP too (Gemma 2/3): four "
                                                   "norms per block.")
    sliding_window: PositiveInt | None = Field(
        None, description="Tokens a query attends to in windowed layers (Mistral, Gemma); None: full attention.")
    global_every: PositiveInt | None = Field(
        None, description="With sliding_window: layer i attends globally when (i + 1) % global_every == 0 (Gemma 2: "
                          "2, Gemma 3: 6); None: every layer is windowed.")
    attention_chunk: PositiveInt | None = Field(
        None, description="Chunked local attention (Llama 4): modelled for sequences up to this length, where it "
                          "is full attention; longer sequences are refused.")
    moe: MoESpec | None = Field(None, description="Mixture-of-experts MLPs; None: a dense model.")
    mla: MLASpec | None = Field(None, description="Multi-head latent attention (DeepSeek-V2/V3) instead of "
                                                  "q/k/v projections; None: multi-head / grouped-query attention.")
    bias: bool = Field(True, description="Linear layers (and LayerNorm) carry biases.")
    qkv_bias: bool | None = Field(None, description="Bias on q, k, v only (Qwen2); defaults to `bias`.")
    position_embedding: Literal["learned", "rope"] = "learned"
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-5
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (hidden and attention).")
    attention_kernel: Literal["flash", "eager"] | None = Field(
        None, description="flash: fused kernel, no score matrix kept; eager: softmax(QK^T)V materialised; "
                          "default: the engine's (--engine).")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelSpec":
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")
        if self.mla is not None:
            self._check_mla()
        elif self.position_embedding == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE rotates pairs of channels: head_dim {self.dim_per_head} "
                             f"{'' if self.head_dim else '(hidden_size / num_heads) '}must be even")
        if self.moe is not None and self.num_moe_layers == 0:
            raise ValueError(f"moe: no layer is a mixture-of-experts layer (first_dense_layers "
                             f"{self.moe.first_dense_layers}, every {self.moe.every}, {self.num_layers} layers)")
        if self.mlp == "geglu" and self.ffn_hidden_size is None:
            raise ValueError("a geglu MLP needs ffn_hidden_size")
        if self.global_every is not None and self.sliding_window is None:
            raise ValueError("global_every needs sliding_window")
        return self

    def _check_mla(self) -> None:
        """Latent attention replaces the q/k/v shapes: every head has its own key and value (no GQA), the head
        widths are the mla ones, keys carry RoPE, and no per-head q/k norm is modelled on top."""
        for name, value, plain in (("num_kv_heads", self.num_kv_heads, (None, self.num_heads)),
                                   ("head_dim", self.head_dim, (None,)), ("qk_norm", self.qk_norm, ("none",)),
                                   ("position_embedding", self.position_embedding, ("rope",)),
                                   ("qkv_bias", self.has_qkv_bias, (False,))):
            if value not in plain:
                raise ValueError(f"mla: {name} {value} is not modelled with multi-head latent attention "
                                 f"(expected {' or '.join(map(str, plain))})")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        """Width of one attention head: head_dim, else hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe.is_moe_layer(i) for i in range(self.num_layers)) if self.moe else 0

    def is_windowed_layer(self, i: int) -> bool:
        return self.sliding_window is not None and not (
            self.global_every is not None and (i + 1) % self.global_every == 0)

    @property
    def num_windowed_layers(self) -> int:
        return sum(self.is_windowed_layer(i) for i in range(self.num_layers))

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.mlp == "gelu":
            return 4 * self.hidden_size

        # Llama (Touvron et al. 2023, Sec. 2.2): 2/3 * 4h, rounded up to a multiple of 256 (geglu needs the width).
        return -(-(8 * self.hidden_size // 3) // 256) * 256

    @property
    def attention(self) -> str:
        """The attention kernel: the spec's, else flash (what `meshplan run` runs; the cost model resolves
        None to the engine's choice before it gets here)."""
        return self.attention_kernel or "flash"

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias


# ----------------------------------------------------------------------------------------------
# Cluster
# ----------------------------------------------------------------------------------------------
class EfficiencyModel(_Spec):
    """How close real kernels get to the spec sheet on this GPU (fitted once per GPU type).

    A GEMM of shape (M, N, K) runs at peak * gemm_max * prod(x / (x + gemm_tile) for x in M, N, K)
    unless memory-bound; every kernel takes at least `kernel_overhead_s` (the host issue rate).
    """

    gemm_max: float = Field(0.8, gt=0, le=1, description="Fraction of dense peak reached by large GEMMs.")
    gemm_tile: float = Field(64.0, ge=0, description="Elements; a GEMM dimension x is used at x/(x+gemm_tile).")
    flash_attention: float = Field(0.5, gt=0, le=1, description="Fraction of dense peak reached by fused attention.")
    attention_tile: float = Field(
        0.0, ge=0, description="Fused attention runs at flash_attention * n / (n + attention_tile), n its thread "
                               "blocks (batch x local heads x seq/128): few heads per GPU leave SMs idle.")
    attention_head_dim: float = Field(
        0.0, ge=0, description="Fused attention also runs at d / (d + attention_head_dim), d its head dimension: the "
                               "softmax's work per score (exponent, max, sum) against the 4d FLOPs of its two "
                               "matmuls; 0 where not measured.")
    gemm_backward: float = Field(
        1.0, gt=0, le=1, description="The backward's GEMMs (dX = dY W^T, dW = X^T dY, transposed operands) run at "
                                     "this fraction of the forward GEMM rate of the same shape.")
    memory: float = Field(0.8, gt=0, le=1, description="Fraction of HBM bandwidth reached by elementwise kernels.")
    kernel_overhead_s: float = Field(
        5e-6, ge=0, description="Seconds: the shortest a kernel runs on the device (launch latency). The host's "
                                "time to issue kernels is the engine's (planner/engine.py HostCosts).")


class GPUSpec(_Spec):
    """One accelerator type (or a CPU socket acting as one device)."""

    name: str
    memory_bytes: PositiveInt = Field(description="Device memory, bytes.")
    peak_flops: dict[Literal["bf16", "fp16", "tf32", "fp32"], PositiveFloat] = Field(
        description="Dense peak FLOP/s per matmul dtype.")
    hbm_bandwidth: PositiveFloat = Field(description="Device memory bandwidth, bytes/s.")
    efficiency: EfficiencyModel = EfficiencyModel()
    runtime_reserved_bytes: int = Field(
        0, ge=0, description="Bytes outside the framework's allocator (CUDA context, NCCL buffers).")
    allocator_margin: float = Field(
        0.05, ge=0, le=1, description="Reserved-but-unallocated bytes, as a fraction of the allocated peak.")
    async_launch: bool = Field(
        True, description="Kernels run asynchronously to the host that issues them (GPUs); false: the host runs "
                          "them itself (a CPU), so host and kernel times add.")

    @model_validator(mode="after")
    def _check_peaks(self) -> "GPUSpec":
        if "fp32" not in self.peak_flops:
            raise ValueError("peak_flops needs at least an fp32 entry")
        return self

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for matmuls in `dtype` (falls back to fp32 when the type has no such unit)."""
        return self.peak_flops.get(dtype, self.peak_flops["fp32"])


class LinkSpec(_Spec):
    """A class of links: alpha-beta parameters of one direction."""

    bandwidth: PositiveFloat = Field(description="Bytes/s in one direction (per GPU intra-node, per NIC inter-node).")
    latency: float = Field(ge=0, description="Seconds per message (alpha).")
    efficiency: float = Field(1.0, gt=0, le=1, description="Fraction of `bandwidth` collectives reach (bus bandwidth).")

    @property
    def effective_bandwidth(self) -> float:
        return self.bandwidth * self.efficiency


class NodeGroup(_Spec):
    """Nodes of one kind. In `node_groups` each group may bring its own links; unset ones are the cluster's."""

    name: str = Field("nodes", description="Group name (unique in `node_groups`).")
    count: PositiveInt = Field(1, description="Number of nodes.")
    gpus_per_node: PositiveInt = 8
    gpu_type: str = Field(description="Key into ClusterSpec.gpu_types.")
    intra_node: LinkSpec | None = Field(None, description="This group's GPU-to-GPU link; default: the cluster's.")
    inter_node: LinkSpec | None = Field(None, description="This group's NIC; default: the cluster's.")
    nics_per_node: PositiveInt | None = Field(None, description="NICs per node; default: the cluster's.")


class GroupLink(_Spec):
    """The network between two node groups (e.g. two pods joined by Ethernet)."""

    between: tuple[str, str] = Field(description="The two node group names.")
    bandwidth: PositiveFloat = Field(description="Bytes/s per node, one direction, between the groups.")
    latency: float = Field(ge=0, description="Seconds per message.")
    efficiency: float = Field(1.0, gt=0, le=1, description="Fraction of `bandwidth` collectives reach.")
    oversubscription: float = Field(1.0, ge=1, description="Nodes' bandwidth over the link's: per-node bandwidth "
                                                           "is divided by it when every node sends at once.")


class Topology(_Spec):
    """A two-level leaf/spine fabric over all nodes in listing order (networkx builds the switch graph)."""

    kind: Literal["leaf_spine"] = "leaf_spine"
    nodes_per_leaf: PositiveInt = Field(description="Nodes under one leaf switch.")
    oversubscription: float = Field(1.0, ge=1, description="A leaf's downlink over its uplink bandwidth.")


class LinkMatrix(_Spec):
    """Measured point-to-point links between ranks (from `meshplan profile cluster`)."""

    world_size: PositiveInt
    bandwidth: list[list[float]] = Field(description="bandwidth[i][j]: bytes/s from rank i to j (diagonal 0).")
    latency: list[list[float]] = Field(description="latency[i][j]: seconds (diagonal 0).")

    @model_validator(mode="after")
    def _check_square(self) -> "LinkMatrix":
        for name in ("bandwidth", "latency"):
            rows = getattr(self, name)
            if len(rows) != self.world_size or any(len(r) != self.world_size for r in rows):
                raise ValueError(f"{name} must be a {self.world_size}x{self.world_size} matrix")
        return self


class CollectiveMeasurement(_Spec):
    op: Literal["all_reduce", "all_gather", "reduce_scatter"]
    group_size: PositiveInt
    contiguous: bool
    message_bytes: PositiveInt
    bus_bandwidth: PositiveFloat = Field(description="nccl-tests bus bandwidth, bytes/s.")
    time_s: PositiveFloat


class CalibrationParameter(_Spec):
    path: str = Field(description="Dotted path: `gpu.` for the GPU type, `engine.` for the engine's data.")
    before: float
    after: float
    lower: float
    upper: float
    target: Literal["step_time", "peak_reserved"] = Field("step_time", description="The measurement it was fitted to.")
    reason: str = Field("", description="Why the runs identify it.")


class SkippedParameter(_Spec):
    path: str
    reason: str = Field(description="Why it was not fitted to these runs.")


class CalibratedRun(_Spec):
    label: str = Field(description="Where the run came from (file and line).")
    config: str = Field("", description="Model, parallel configuration, batch and sequence.")
    measured_s: PositiveFloat = Field(description="Measured step time, seconds.")
    before_s: float = Field(description="Predicted step time with the spec as it was.")
    after_s: float = Field(description="Predicted step time with the fitted parameters.")
    loo_s: float | None = Field(None, description="Predicted step time when this run was left out of the fit.")
    measured_peak_bytes: int | None = Field(None, description="Measured peak reserved bytes.")
    before_peak_bytes: int | None = Field(None, description="Predicted peak reserved bytes before the fit.")
    after_peak_bytes: int | None = None
    loo_peak_bytes: int | None = None


class Calibration(_Spec):
    """What `meshplan calibrate` fitted, to which runs, and how well (errors: mean absolute percentage error)."""

    engine: str
    cluster: str = Field("", description="The cluster spec the fit started from.")
    runs: list[CalibratedRun]
    parameters: list[CalibrationParameter]
    skipped: list[SkippedParameter] = Field(default_factory=list, description="Candidates not fitted, and why.")
    error_before_pct: float = Field(description="Mean absolute error of step time before the fit, percent.")
    error_after_pct: float = Field(description="The same after the fit (in sample).")
    loo_error_pct: float | None = Field(None, description="Leave-one-out mean absolute error, percent.")
    memory_error_before_pct: float | None = None
    memory_error_after_pct: float | None = None
    memory_loo_error_pct: float | None = None


class ClusterSpec(_Spec):
    """Nodes of identical devices joined by an intra-node fabric and NICs."""

    name: str
    description: str = ""
    backend: Literal["nccl", "gloo"] = "nccl"
    gpu_types: dict[str, GPUSpec]
    nodes: NodeGroup | None = Field(None, description="The nodes, all alike (or give `node_groups`).")
    node_groups: list[NodeGroup] = Field(
        default_factory=list, description="Nodes of several kinds (GPU types, links), in rank order; one group is "
                                          "the same as `nodes`.")
    group_links: list[GroupLink] = Field(
        default_factory=list, description="Links between node groups; default: the slower of the two groups' NICs.")
    topology: Topology | None = Field(None, description="Optional leaf/spine fabric the node-to-node bandwidth "
                                                        "follows from; a measured link_matrix wins over it.")
    intra_node: LinkSpec | None = Field(
        None, description="GPU-to-GPU inside a node (NVLink/NVSwitch): per GPU, one direction.")
    inter_node: LinkSpec | None = Field(None, description="One NIC: bandwidth per NIC, one direction.")
    nics_per_node: PositiveInt = 8
    overlap_slowdown: float = Field(
        0.1, ge=0, le=1, description="Fraction of overlapped communication time still lost to compute slow-down.")
    link_matrix: LinkMatrix | None = None
    collectives: list[CollectiveMeasurement] = Field(default_factory=list)
    measured: bool = Field(False, description="True when written by `meshplan profile cluster`.")
    engine_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per engine name, dotted paths into its engine spec with the values measured or fitted on "
                    "this cluster (host costs differ between host CPUs), e.g. {meshplan: {host.per_kernel_s: 2e-3}}.")
    calibration: Calibration | None = Field(None, description="Written by `meshplan calibrate`.")

    @model_validator(mode="before")
    @classmethod
    def _one_group(cls, data):
        """A single entry of `node_groups` is the plain `nodes` form (its links become the cluster's)."""
        groups = data.get("node_groups") if isinstance(data, dict) else None
        if isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict) and data.get("nodes") is None:
            data = dict(data)
            group = dict(data.pop("node_groups")[0])
            for key in ("intra_node", "inter_node", "nics_per_node"):
                if group.get(key) is not None:
                    data[key] = group.pop(key)
                group.pop(key, None)
            data["nodes"] = group
        return data

    @model_validator(mode="after")
    def _check_refs(self) -> "ClusterSpec":
        if (self.nodes is None) == (not self.node_groups):
            raise ValueError("give either nodes or node_groups (two or more), not both")
        for key in ("intra_node", "inter_node"):
            if any(getattr(g, key) is None for g in self.groups_raw()) and getattr(self, key) is None:
                raise ValueError(f"{key} is required (for the cluster or for every node group)")
        names = [g.name for g in self.groups_raw()]
        if len(set(names)) != len(names):
            raise ValueError(f"node group names must be unique (got {', '.join(names)})")
        for g in self.groups_raw():
            if g.gpu_type not in self.gpu_types:
                where = "nodes" if self.nodes is not None else f"node_groups '{g.name}'"
                raise ValueError(f"{where}.gpu_type '{g.gpu_type}' is not one of gpu_types "
                                 f"({', '.join(self.gpu_types)})")
        for link in self.group_links:
            for name in link.between:
                if name not in names:
                    raise ValueError(f"group_links names '{name}', not a node group ({', '.join(names)})")
        if self.link_matrix is not None and self.link_matrix.world_size != self.world_size:
            raise ValueError(f"link_matrix covers {self.link_matrix.world_size} ranks but the cluster has "
                             f"{self.world_size} GPUs")
        return self

    def groups_raw(self) -> list[NodeGroup]:
        """The node groups as written (`nodes` as the one group)."""
        return [self.nodes] if self.nodes is not None else list(self.node_groups)

    @property
    def heterogeneous(self) -> bool:
        """Several node groups (GPU types or links differ): only the heterogeneous search plans it."""
        return self.nodes is None

    def _single(self, what: str):
        if self.heterogeneous:
            from planner.errors import InputError
            raise InputError(f"cluster '{self.name}' has {len(self.node_groups)} node groups ({what} needs one "
                             f"kind of node); only `meshplan plan` and `meshplan run` take node groups",
                             field="--cluster")
        return self.nodes

    @property
    def gpu(self) -> GPUSpec:
        return self.gpu_types[(self.nodes or self._single("one GPU type")).gpu_type]

    @property
    def gpus_per_node(self) -> int:
        if self.nodes is not None:
            return self.nodes.gpus_per_node
        sizes = {g.gpus_per_node for g in self.node_groups}
        if len(sizes) > 1:
            self._single("one node size")
        return sizes.pop()

    @property
    def num_nodes(self) -> int:
        if self.nodes is not None:
            return self.nodes.count
        return sum(g.count for g in self.node_groups)

    @property
    def world_size(self) -> int:
        if self.nodes is not None:
            return self.nodes.count * self.nodes.gpus_per_node
        return sum(g.count * g.gpus_per_node for g in self.node_groups)

    def resized(self, nodes: int | None = None, gpus_per_node: int | None = None) -> "ClusterSpec":
        """The same hardware with other node / GPU counts (a measured link matrix no longer applies)."""
        if nodes is None and gpus_per_node is None:
            return self
        self._single("--nodes / --gpus-per-node")
        group = self.nodes.model_copy(update={
            "count": nodes or self.nodes.count,
            "gpus_per_node": gpus_per_node or self.nodes.gpus_per_node})
        keep_matrix = group.count * group.gpus_per_node == self.world_size and group == self.nodes
        return self.model_copy(update={"nodes": group, "link_matrix": self.link_matrix if keep_matrix else None})


# ----------------------------------------------------------------------------------------------
# Training and parallel configuration
# ----------------------------------------------------------------------------------------------
class TrainingSpec(_Spec):
    """What one optimizer step processes and how numbers are kept."""

    global_batch: PositiveInt = Field(description="Sequences per optimizer step.")
    seq_len: PositiveInt = Field(description="Tokens per sequence.")
    precision: Precision = Field(
        "bf16",
        description="bf16/fp16: Megatron-style mixed precision, 16-bit weights with fp32 master weights and "
                    "fp32 (bf16) or 16-bit (fp16) gradients; amp-bf16: autocast over fp32 parameters with a "
                    "plain optimizer; fp32: everything fp32.")
    optimizer: Optimizer = "adamw"
    overlap_grad_reduce: bool | None = Field(
        None, description="Override the engine's choice: data-parallel gradient reduction overlaps the backward "
                          "(true) or runs after it (false); default: the engine's (planner/engine.py).")

    moe_imbalance: float | None = Field(
        None, ge=1.0, le=64.0,
        description="Mixture-of-experts models: routed tokens the busiest expert computes, as a multiple of the mean "
                    "(the busiest expert-parallel rank's follows from it); default planner.cost.moe.DEFAULT_IMBALANCE "
                    "(1.25).")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


class ParallelConfig(_Spec):
    """One way to split the job over the GPUs."""

    tp: PositiveInt = Field(1, description="Tensor-parallel degree.")
    pp: PositiveInt = Field(1, description="Pipeline-parallel degree (stages).")
    dp: PositiveInt = Field(1, description="Data-parallel degree.")
    ep: PositiveInt = Field(1, description="Expert-parallel degree: each MoE layer's routed experts sharded over ep "
                                           "ranks of the data-parallel group (ep divides dp and the expert count).")
    vpp: PositiveInt = Field(1, description="Virtual pipeline stages (model chunks) per GPU.")
    mbs: PositiveInt = Field(1, description="Micro-batch size, sequences.")
    zero: Literal[0, 1, 2, 3] = Field(0, description="ZeRO stage over the data-parallel group.")
    recompute: Recompute = "none"
    sp: bool = Field(False, description="Sequence parallelism (with tp > 1).")
    schedule: Schedule = "1f1b"
    layers_per_stage: list[int] | None = Field(
        None, description="Layers of each model chunk, in pipeline order (pp*vpp entries); default balanced.")

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.vpp > 1 and self.schedule != "interleaved":
            raise ValueError(f"vpp {self.vpp} > 1 needs schedule 'interleaved' (got '{self.schedule}')")
        if self.schedule == "interleaved" and self.vpp < 2:
            raise ValueError("schedule 'interleaved' needs vpp >= 2")
        if self.schedule == "interleaved" and self.pp < 2:
            raise ValueError("schedule 'interleaved' needs pp >= 2")
        if self.sp and self.tp == 1:
            raise ValueError("sp (sequence parallelism) needs tp > 1")
        if self.layers_per_stage is not None:
            if len(self.layers_per_stage) != self.pp * self.vpp:
                raise ValueError(f"layers_per_stage has {len(self.layers_per_stage)} entries; pp*vpp = "
                                 f"{self.pp * self.vpp}")
            if any(n < 0 for n in self.layers_per_stage):
                raise ValueError("layers_per_stage entries must be >= 0")
        return self

    @property
    def dims(self) -> ParallelDims:
        """The parallel dimensions, ranks in Megatron-LM's order (ResolvedConfig: its own `layout`)."""
        return ParallelDims.of(self)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def microbatches(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.mbs)

    def short(self) -> str:
        """A compact one-line label, e.g. 'tp8 pp4 dp2 mbs1 z1 full sp 1f1b'."""
        parts = [f"tp{self.tp}", f"pp{self.pp}", f"dp{self.dp}"] + ([f"ep{self.ep}"] if self.ep > 1 else [])
        if self.vpp > 1:
            parts.append(f"v{self.vpp}")
        parts += [f"mbs{self.mbs}", f"z{self.zero}", self.recompute]
        if self.sp:
            parts.append("sp")
        parts.append(self.schedule)
        return " ".join(parts)
