"""The kernels one TP rank runs for a block, the embedding and the LM head, and how long they take.

Each pass (forward, backward, recomputation) is a list of kernels with the FLOPs and device-memory bytes they
move. Which kernels run is the engine's (DESIGN.md Sec. 8): a piece the engine fuses (norm, activation,
bias-dropout-add, RoPE, softmax, cross entropy) is one kernel, as in Megatron-LM with Transformer Engine;
otherwise it is the chain of kernels eager PyTorch runs for it, as runtime/models.py writes it (e.g. RMSNorm:
cast, square, mean, rsqrt, two multiplies). A kernel's device time is the larger of its compute time (FLOPs
over the achievable rate for its shape), its memory time and the device's minimum kernel time; a pass takes
the larger of its device time and the host's time to issue its kernels (asynchronous launch: in steady state
the host runs ahead unless it is the slower side), or their sum on a synchronous device (a CPU).
Tensor-parallel collectives are listed separately and costed by `comm.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from planner.specs import GPUSpec, ModelSpec

FP32 = 4
ALL_FUSED = frozenset({"norm", "activation", "bias_dropout_add", "rope", "softmax", "cross_entropy", "projections"})


@dataclass(frozen=True)
class Kernel:
    kind: Literal["gemm", "attn", "mem"]
    flops: float = 0.0           # FLOP executed (hardware, not model, FLOPs)
    bytes: float = 0.0           # bytes read and written in device memory
    shape: tuple[float, float, float] = (0.0, 0.0, 0.0)   # (M, N, K) of one GEMM of a batch; attention: (thread
    #                                                       blocks, head dimension, 1)
    backward: bool = False       # a backward GEMM (transposed operands)


@dataclass(frozen=True)
class Collective:
    op: Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]
    bytes: float                 # message size M of the collective (the full, unsharded buffer; all-to-all: per rank)
    group: Literal["tp", "ep"] = "tp"   # the tensor-parallel or the expert-parallel group
    conjugate: bool = True       # a forward collective whose conjugate runs in backward (kernels.block_work)


@dataclass
class Pass:
    """The work of one pass over a piece of the model, for one micro-batch on one TP rank."""

    kernels: list[Kernel] = field(default_factory=list)
    collectives: list[Collective] = field(default_factory=list)
    backward: bool = False       # issued by the autograd engine (its host cost per kernel differs)

    def gemm(self, m: float, n: float, k: float, elem: int, batch: float = 1.0) -> None:
        self.kernels.append(Kernel("gemm", 2.0 * batch * m * n * k, elem * batch * (m * k + k * n + m * n),
                                   (m, n, k), self.backward))

    def mem(self, nbytes: float) -> None:
        self.kernels.append(Kernel("mem", bytes=nbytes))

    def chain(self, *nbytes: float) -> None:
        """A chain of elementwise kernels, one per entry (bytes read and written by each)."""
        for b in nbytes:
            self.mem(b)

    def extend(self, other: "Pass") -> None:
        self.kernels += other.kernels
        self.collectives += other.collectives


@dataclass(frozen=True)
class Dtypes:
    """Element sizes (bytes) of one precision recipe."""

    act: int        # activations and 16-bit GEMM operands
    residual: int   # the residual stream and norm inputs (fp32 under autocast)
    matmul: str     # key into GPUSpec.peak_flops

    @staticmethod
    def of(precision: str) -> "Dtypes":
        """By precision name (bf16, fp16, amp-bf16, amp-fp16, fp32) or memory-recipe compute type."""
        return _DTYPES[precision]

    @property
    def autocast(self) -> bool:
        return self.residual > self.act


_DTYPES = {"bf16": Dtypes(2, 2, "bf16"), "fp16": Dtypes(2, 2, "fp16"),
           "amp-bf16": Dtypes(2, FP32, "bf16"), "autocast-bf16": Dtypes(2, FP32, "bf16"),
           "amp-fp16": Dtypes(2, FP32, "fp16"), "autocast-fp16": Dtypes(2, FP32, "fp16"),
           "fp32": Dtypes(FP32, FP32, "fp32")}


@dataclass(frozen=True)
class KernelOptions:
    """What of an engine shapes the kernels and the kept tensors of a block (hashable, for caches)."""

    fused: frozenset[str] = ALL_FUSED
    selective: str = "attention_core"       # what `selective` recompute recomputes (EngineSpec.recompute)
    sp_saves: str = "sharded"               # sequence-parallel linear inputs kept sharded or gathered
    casts_per_linear: bool = False          # autocast casts each Linear's input separately
    logits_fp32: bool = True                # the loss reads an fp32 copy of the logits
    gemm_scale: float = 1.0                 # share of the GPU's GEMM rate the engine's GEMMs reach
    softmax_shapes: str = "any"             # shapes the fused softmax runs at (engine.Kernels.softmax_shapes)

    @staticmethod
    def of(engine) -> "KernelOptions":
        return KernelOptions(fused=engine.fused, selective=engine.recompute.selective,
                             sp_saves=engine.memory_extras.sp_saves,
                             casts_per_linear=engine.memory_extras.autocast_casts_per_linear,
                             logits_fp32=engine.memory_extras.logits_fp32,
                             gemm_scale=engine.kernels.gemm_efficiency,
                             softmax_shapes=engine.kernels.softmax_shapes)


MEGATRON = KernelOptions()


def kernel_time(k: Kernel, gpu: GPUSpec, dtype: str, gemm_scale: float = 1.0) -> float:
    """Device seconds: max(compute, memory, the device's minimum kernel time). `gemm_scale`: the share of the
    GPU's GEMM rate the engine's GEMM calls reach (its library, layouts and version)."""
    eff = gpu.efficiency
    memory = k.bytes / (gpu.hbm_bandwidth * eff.memory)
    if k.kind == "mem":
        compute = 0.0
    elif k.kind == "attn":
        blocks, head_dim = k.shape[0], k.shape[1]
        compute = k.flops / (gpu.peak(dtype) * eff.flash_attention * blocks / (blocks + eff.attention_tile)
                             * head_dim / (head_dim + eff.attention_head_dim))
    else:
        rate = (eff.gemm_max * gemm_scale * shape_efficiency(k.shape, eff.gemm_tile)
                * (eff.gemm_backward if k.backward else 1.0))
        compute = k.flops / (gpu.peak(dtype) * rate)
    return max(compute, memory, eff.kernel_overhead_s)


def shape_efficiency(shape: tuple[float, float, float], tile: float) -> float:
    """prod(x / (x + tile)) over a GEMM's M, N, K: the share of the GEMM ceiling a shape reaches."""
    out = 1.0
    for x in shape:
        out *= x / (x + tile)
    return out


def device_time(p: Pass, gpu: GPUSpec, dtype: str, gemm_scale: float = 1.0) -> float:
    """Device seconds of the kernels of a pass (collectives excluded)."""
    return sum(kernel_time(k, gpu, dtype, gemm_scale) for k in p.kernels)


def pass_time(p: Pass, gpu: GPUSpec, dtype: str, host_per_kernel: float = 0.0, comm: float = 0.0,
              host_per_collective: float = 0.0, gemm_scale: float = 1.0) -> float:
    """Seconds of a pass: its kernels' device time plus `comm` seconds of blocking collectives, against the
    host's time to issue them (`host_per_kernel` each, `host_per_collective` per collective): the larger of the
    two on an asynchronous device (steady-state launch queue), their sum on a synchronous one."""
    device = device_time(p, gpu, dtype, gemm_scale) + comm
    host = len(p.kernels) * host_per_kernel + len(p.collectives) * host_per_collective
    return launched(device, host, gpu)


def launched(device: float, host: float, gpu: GPUSpec) -> float:
    """Seconds of work taking `device` seconds on the device and `host` seconds to issue: the larger of the two on
    an asynchronous device, their sum on a synchronous one."""
    return max(device, host) if gpu.async_launch else device + host


def isolated_pass_time(p: Pass, gpu: GPUSpec, dtype: str, host_per_kernel: float, gemm_scale: float = 1.0) -> float:
    """Seconds of one pass timed alone from an idle, synchronised device (what a profiler's CUDA events around a
    single block measure): one in-order stream fed by the host, kernel k launched host_per_kernel after kernel
    k-1's launch and started when both it is launched and its predecessor is done. It lies between
    `pass_time`'s max(host, device) (the steady state of many passes back to back, where the queue carries
    the slack over) and their sum; collectives excluded."""
    return isolated_time([(p, host_per_kernel)], gpu, dtype, gemm_scale)


def isolated_time(segments: list[tuple[Pass, float]], gpu: GPUSpec, dtype: str, gemm_scale: float = 1.0) -> float:
    """`isolated_pass_time` of passes issued back to back in one timed region, each with its own host seconds
    per kernel (a backward under recomputation: the replayed forward, then the backward's kernels)."""
    if not gpu.async_launch:
        return sum(device_time(p, gpu, dtype, gemm_scale) + len(p.kernels) * host for p, host in segments)
    launched = done = 0.0
    for p, host in segments:
        for k in p.kernels:
            launched += host
            done = max(done, launched) + kernel_time(k, gpu, dtype, gemm_scale)
    return done


# ----------------------------------------------------------------------------------------------
# Elementwise pieces: one fused kernel, or eager PyTorch's chain (as runtime/models.py writes them)
# ----------------------------------------------------------------------------------------------
def _norm(fwd: Pass, bwd: Pass, m: ModelSpec, n: float, er: int, out: int, fused: bool) -> None:
    """A norm over n elements read in dtype `er`, written in `out`. LayerNorm is one kernel even in eager
    PyTorch (native_layer_norm; its backward computes dx and the weight/bias gradients in two); the eager RMSNorm
    is runtime/models.py's _RMSNormFunction: [cast to fp32,] square, mean, rsqrt (+eps), scale, [cast,] weight."""
    if fused or m.norm == "layernorm":
        fwd.mem(n * (er + out))
        bwd.chain(n * (er + out + er), n * er)
        return
    cast = er < FP32
    fwd.chain(*([n * (er + FP32)] if cast else []), n * 2 * FP32, n * FP32, 0.0, 0.0, n * 2 * FP32,
              *([n * (FP32 + er)] if cast else []), n * 2 * er)
    # backward: xhat, cast grad, g*xhat, sum, g*w, gw*xhat, mean, xhat*mean, subtract, rstd*, cast
    bwd.chain(*([n * (er + FP32)] * (2 if cast else 0)), n * 2 * FP32, n * 3 * FP32, n * FP32, n * 2 * FP32,
              n * 3 * FP32, n * FP32, n * 3 * FP32, n * 3 * FP32, n * 2 * FP32,
              *([n * (FP32 + er)] if cast else []))


def _activation(fwd: Pass, bwd: Pass, m: ModelSpec, n_up: float, n_out: float, e: int, fused: bool) -> None:
    """GELU (one kernel either way; a bias is added inside the GEMM) or SwiGLU over n_out outputs from n_up
    inputs (gate and up). Eager SwiGLU is runtime/models.py's SwiGLUFunction: silu, multiply; its backward
    recomputes sigmoid and silu in seven more kernels."""
    if m.mlp != "swiglu" or fused:
        fwd.mem((n_up + n_out) * e)
        bwd.mem(1.5 * (n_up + n_out) * e)
        return
    fwd.chain(2 * n_out * e, 3 * n_out * e)
    bwd.chain(2 * n_out * e, *([3 * n_out * e] * 7), 2 * n_out * e)


def _rope(fwd: Pass, bwd: Pass, n: float, e: int, fused: bool) -> None:
    """Rotary embedding of n elements (q or k): x*cos + rotate_half(x)*sin. Eager: multiply, negate half,
    concatenate, multiply, add (runtime/models.py _RoPEFunction), the same five in backward."""
    if fused:
        fwd.mem(2 * n * e)
        bwd.mem(2 * n * e)
        return
    for p in (fwd, bwd):
        p.chain(2 * n * e, n * e, 2 * n * e, 2 * n * e, 3 * n * e)


def _residual(fwd: Pass, bwd: Pass, n: float, e: int, er: int, dropout: bool, fused: bool) -> None:
    """Bias-dropout-add onto the residual stream (n elements): fused one kernel; eager a dropout (keeping a
    1-byte mask) and an add. Its backward is the dropout's (the add passes the gradient through)."""
    mask = 1 if dropout else 0
    if fused:
        fwd.mem(n * (e + er + er + mask))
        if dropout:
            bwd.mem(n * (e + er + mask))
        return
    if dropout:
        fwd.mem(n * (2 * e + mask))
        bwd.mem(n * (2 * e + mask))
    fwd.mem(n * (e + 2 * er))


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------
@dataclass
class BlockWork:
    forward: Pass
    backward: Pass
    recompute: Pass      # extra forward work before the backward (empty without recomputation)


def _tp_in(p: Pass, nbytes: float, tp: int, sp: bool) -> None:
    """Megatron's `f`/`g` conjugates before a column-parallel linear: all-gather under SP."""
    if tp > 1 and sp:
        p.collectives.append(Collective("all_gather", nbytes))


def _tp_out(p: Pass, nbytes: float, tp: int, sp: bool, conjugate: bool = True) -> None:
    """After a row-parallel linear: all-reduce, or reduce-scatter under SP (Korthikanti et al. Sec. 4.2.2).
    Without SP the backward all-reduce (of the block input's gradient, Megatron's `f`) is counted as this one's
    conjugate unless `conjugate` is false (latent attention reduces a narrower gradient: planner/cost/mla.py)."""
    if tp > 1:
        p.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", nbytes, conjugate=conjugate))


_CONJUGATE = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "all_reduce",
              "all_to_all": "all_to_all"}


def causal_keys(seq: int, window: int | None) -> float:
    """Mean keys a query attends to under a causal mask (within a sliding window when given): s/2 without a
    window, (s*w - w^2/2)/s with one (queries past the first w see w keys)."""
    w = min(seq, window or seq)
    return (seq * w - w * w / 2) / seq


def fused_softmax_runs(opts: KernelOptions, mbs: int, heads: float, seq: int) -> bool:
    """Whether the engine's fused scale-mask-softmax runs for these score matrices. Megatron's kernel
    (megatron/model/fused_softmax.py, FusedScaleMaskSoftmax.is_kernel_available) needs 16 < seq <= 4096,
    seq % 4 == 0 and (micro-batch x local heads) a multiple of 4 and of the causal kernel's batches per block
    (scaled_upper_triang_masked_softmax.h: 8 for seq <= 128, 4 above)."""
    if "softmax" not in opts.fused:
        return False
    if opts.softmax_shapes == "megatron":
        attn_batches = mbs * heads
        per_block = 8 if seq <= 128 else 4
        return 16 < seq <= 4096 and seq % 4 == 0 and attn_batches == int(attn_batches) and \
            int(attn_batches) % per_block == 0
    return True


def eager_attention_core(core: Pass, mbs: int, heads: float, seq: int, qk_dim: int, v_dim: int, e: int,
                         opts: KernelOptions, dropout: bool) -> None:
    """softmax(Q K^T) V materialised, per head: scores over qk_dim channels, values of v_dim; scale, mask and
    softmax one fused kernel, eager PyTorch's three, or (an engine whose fused kernel does not take the shape)
    Megatron's fallback in fp32; attention dropout with its 1-byte mask."""
    scores = mbs * heads * seq * seq                    # elements of one rank's score matrices
    core.gemm(seq, seq, qk_dim, e, batch=mbs * heads)                            # Q K^T
    if fused_softmax_runs(opts, mbs, heads, seq):
        core.mem(2 * scores * e)                                                 # scale-mask-softmax
    elif "softmax" in opts.fused:
        # FusedScaleMaskSoftmax.forward_torch_softmax with softmax_in_fp32 (query-key layer scaling): cast up,
        # scale, masked_fill, softmax, cast down
        core.chain(scores * (e + FP32), 2 * scores * FP32, 2 * scores * FP32, 2 * scores * FP32,
                   scores * (FP32 + e))
    else:
        core.chain(2 * scores * e, 3 * scores * e, 2 * scores * e)               # scale, + mask, softmax
    if dropout:
        core.mem(scores * (2 * e + 1))                                           # attention dropout
    core.gemm(seq, v_dim, seq, e, batch=mbs * heads)                             # P V
    core.mem(2 * mbs * seq * heads * v_dim * e)                                  # heads back to [s, b, h]


def block_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, recompute: str, dt: Dtypes,
               opts: KernelOptions = MEGATRON, moe_layer: bool = False, windowed: bool = False, ep: int = 1,
               imbalance: float = 1.0) -> BlockWork:
    """Kernels and collectives of one block for one micro-batch on one TP rank, as the engine of `opts` runs
    them: a dense or a MoE layer (planner/cost/moe.py: its experts sharded over `ep` ranks, the busiest of them
    computing `imbalance` times the mean of the routed tokens), attending globally or in the sliding window."""
    e, er = dt.act, dt.residual
    h, d, f = m.hidden_size, m.dim_per_head, m.ffn_size
    fused = opts.fused
    heads = m.num_heads / tp
    q_out, kv_out = heads * d, m.kv_heads / tp * d
    attn_out = heads * m.mla.v_head_dim if m.mla else q_out     # the output projection's input width
    tokens = mbs * seq
    local_tokens = tokens / tp if sp else tokens        # the residual stream is sequence-sharded under SP
    act_bytes = tokens * h * e
    dropout = m.dropout > 0
    swiglu = m.mlp != "gelu"          # gated: gate and up (SwiGLU or GeGLU)
    up_width = f / tp * (2 if swiglu else 1)
    norm_out = FP32 if dt.autocast else e               # under autocast the norms write fp32
    linear_inputs_cast = 3 if opts.casts_per_linear else 1   # q/k/v each cast their fp32 input under autocast

    fwd, bwd_elem, attn_core_fwd = Pass(), Pass(backward=True), Pass()
    projections: list[int] = []          # index in fwd.kernels of each weight GEMM (aten.mm), in order

    def linear(*widths: float, k: float, bias: bool, rows: float = tokens) -> None:
        """Weight GEMMs reading one input of width k on `rows` tokens: one fused GEMM, or one per output
        (separate modules); eager PyTorch reduces each bias gradient in a kernel of its own."""
        for w in ((sum(widths),) if "projections" in fused else widths):
            projections.append(len(fwd.kernels))
            fwd.gemm(rows, w, k, e)
            if bias and "projections" not in fused:
                bwd_elem.mem(rows * w * e)

    # --- attention ---
    _norm(fwd, bwd_elem, m, local_tokens * h, er, norm_out, "norm" in fused)      # norm 1
    if dt.autocast:
        fwd.chain(*[tokens * h * (FP32 + e)] * linear_inputs_cast)               # autocast input casts
    # causal flash kernel skips the masked half of the score matrix (and what lies outside the window)
    keys = causal_keys(seq, m.sliding_window if windowed else None)
    if m.mla is not None:                # multi-head latent attention (DeepSeek-V2/V3)
        from planner.cost.mla import attention_work
        attention_work(fwd, bwd_elem, attn_core_fwd, linear, m, mbs, seq, tp, sp, keys, dt, opts)
    else:
        _tp_in(fwd, act_bytes, tp, sp)
        linear(q_out, kv_out, kv_out, k=h, bias=m.has_qkv_bias)                  # QKV
        if m.qk_norm != "none":                                                  # q and k norms per head
            _norm(fwd, bwd_elem, m, tokens * (q_out + kv_out), e, e, True)
        if m.position_embedding == "rope":
            _rope(fwd, bwd_elem, tokens * q_out, e, "rope" in fused)
            _rope(fwd, bwd_elem, tokens * kv_out, e, "rope" in fused)
        if m.attention == "flash":
            attn_core_fwd.kernels.append(Kernel("attn", 4 * mbs * seq * keys * q_out,
                                                (2 * q_out + 2 * kv_out) * tokens * e + 4 * heads * tokens,
                                                (mbs * heads * seq / 128, d, 1.0)))
        else:
            eager_attention_core(attn_core_fwd, mbs, heads, seq, d, d, e, opts, dropout)
    fwd.extend(attn_core_fwd)
    linear(h, k=attn_out, bias=m.bias)                                           # output projection
    _tp_out(fwd, act_bytes, tp, sp, conjugate=m.mla is None or sp)
    _residual(fwd, bwd_elem, local_tokens * h, e, er, dropout, "bias_dropout_add" in fused)
    if m.sandwich_norm:
        _norm(fwd, bwd_elem, m, local_tokens * h, er, norm_out, "norm" in fused)  # post-attention norm
    # --- MLP ---
    _norm(fwd, bwd_elem, m, local_tokens * h, er, norm_out, "norm" in fused)      # norm 2
    if dt.autocast:
        fwd.chain(*[tokens * h * (FP32 + e)] * ((2 if swiglu else 1) if opts.casts_per_linear else 1))
    if moe_layer:
        from planner.cost.moe import moe_mlp_work
        moe_kernels = len(fwd.kernels)
        moe_mlp_work(fwd, bwd_elem, m, mbs * seq, tp, sp, ep, imbalance, dt, opts)
        moe_kernels = range(moe_kernels, len(fwd.kernels))
    else:
        moe_kernels = range(0)
        _tp_in(fwd, act_bytes, tp, sp)
        linear(*([f / tp] * (2 if swiglu else 1)), k=h, bias=m.bias)             # fc1 (gate, up)
        _activation(fwd, bwd_elem, m, tokens * up_width, tokens * f / tp, e, "activation" in fused)
        linear(h, k=f / tp, bias=m.bias)                                         # fc2
        _tp_out(fwd, act_bytes, tp, sp)
    if m.sandwich_norm:
        _norm(fwd, bwd_elem, m, local_tokens * h, er, norm_out, "norm" in fused)  # post-MLP norm
    _residual(fwd, bwd_elem, local_tokens * h, e, er, dropout, "bias_dropout_add" in fused)

    # --- backward: two GEMMs (data and weight gradients) per forward GEMM, the attention kernel's backward,
    # the elementwise pieces' own backward kernels (listed with their forwards above) ---
    bwd = Pass(backward=True)
    for k in fwd.kernels:
        if k.kind == "gemm":
            mm, nn, kk = k.shape
            batch = k.flops / (2 * mm * nn * kk)
            bwd.gemm(mm, kk, nn, e, batch)      # dX = dY W^T
            bwd.gemm(kk, nn, mm, e, batch)      # dW = X^T dY
        elif k.kind == "attn":
            # FlashAttention-2 backward: 5 matmuls to the forward's 2 (Dao 2023, Sec. 3.1)
            bwd.kernels.append(Kernel("attn", 2.5 * k.flops, 2 * k.bytes, k.shape, True))
    for k in attn_core_fwd.kernels:
        if k.kind == "mem":
            bwd.mem(1.5 * k.bytes)
    bwd.kernels += bwd_elem.kernels
    if sp and tp > 1 and opts.sp_saves == "sharded":
        # Megatron keeps the sequence-sharded QKV and fc1 inputs and gathers them again for dW
        attn_in = act_bytes
        if m.mla is not None:            # the q latent (planner/cost/mla.py)
            from planner.cost.mla import regathered_input_bytes
            attn_in = regathered_input_bytes(m, tokens, dt)
        bwd.collectives += [Collective("all_gather", attn_in), Collective("all_gather", act_bytes)]
    for c in fwd.collectives:   # conjugate collectives in backward (all-reduce stays, AG <-> RS swap)
        if c.conjugate:
            bwd.collectives.append(Collective(_CONJUGATE[c.op], c.bytes, c.group))
    bwd.collectives += bwd_elem.collectives     # backward-only ones (latent attention's, without SP)

    return BlockWork(fwd, bwd, _recompute_pass(fwd, attn_core_fwd, projections, recompute, m, opts, moe_kernels))


def parameter_traffic(elements: float, kernels: int, bytes_per_element: float) -> list[Kernel]:
    """`kernels` elementwise kernels over `elements` parameters (spread evenly), each moving `bytes_per_element`
    per element: the accumulation of weight gradients (one add per tensor) or the copy of gathered parameters
    out of their flat buffer (one kernel)."""
    n = max(kernels, 1)
    return [Kernel("mem", bytes=elements * bytes_per_element / n)] * n if bytes_per_element else []


def projection_widths(m: ModelSpec, tp: int, fused_projections: bool, moe_layer: bool = False,
                      sp: bool = False) -> list[float]:
    """Output widths of a block's weight GEMMs on one TP rank, in forward order (q, k, v, o, gate, up, down;
    q/k/v and gate/up as one GEMM each when the engine fuses projections; latent attention's own, from
    planner/cost/mla.py); a MoE layer's MLP GEMMs are not among them (planner/cost/moe.py keeps their outputs)."""
    q_out, kv_out, f = m.num_heads / tp * m.dim_per_head, m.kv_heads / tp * m.dim_per_head, m.ffn_size / tp
    up = [f, f] if m.mlp != "gelu" else [f]
    mlp = [] if moe_layer else ([sum(up), m.hidden_size] if fused_projections else [*up, m.hidden_size])
    if m.mla is not None:
        from planner.cost.mla import projection_widths as latent_widths
        return [*latent_widths(m, tp, sp), *mlp]
    if fused_projections:
        return [q_out + 2 * kv_out, m.hidden_size, *mlp]
    return [q_out, kv_out, kv_out, m.hidden_size, *mlp]


def kept_projections(count: int) -> list[int]:
    """torchtitan's per-op policy (torchtitan/distributed/activation_checkpoint.py): of a block's weight GEMMs
    (aten.mm, in forward order) it keeps the outputs of the 1st, 3rd, 5th, ... and recomputes the others."""
    return [j for j in range(count) if j % 2 == 0]


def _recompute_pass(fwd: Pass, attn_core: Pass, projections: list[int], recompute: str, m: ModelSpec,
                    opts: KernelOptions, moe_kernels: range = range(0)) -> Pass:
    """The forward work replayed before a block's backward (under the per-op policy, a MoE layer's expert
    kernels are not replayed: their outputs are kept, as planner/cost/moe.py counts them)."""
    if recompute == "full":
        return fwd
    if recompute != "selective":
        return Pass()
    if opts.selective == "attention_core":
        # Korthikanti et al. Sec. 5: recompute only the attention core (flash recomputes its scores anyway)
        return attn_core if m.attention == "eager" else Pass()
    # torchtitan's op policy: everything runs again but the fused attention kernel and the kept weight GEMMs
    kept = {projections[j] for j in kept_projections(len(projections))} | set(moe_kernels)
    out = Pass()
    out.kernels = [k for i, k in enumerate(fwd.kernels) if k.kind != "attn" and i not in kept]
    out.collectives = [c for c in fwd.collectives if c.group == "tp"]
    return out


# ----------------------------------------------------------------------------------------------
# Embedding and LM head with loss
# ----------------------------------------------------------------------------------------------
def embedding_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes,
                   vocab: int | None = None) -> tuple[Pass, Pass]:
    """Vocab-parallel embedding lookup (+ learned positions, dropout); its backward scatters into dE.
    `vocab`: the (padded) vocabulary the embedding holds, default the model's. Under SP the partial lookups
    are reduce-scattered onto the sequence shards."""
    tokens, h, e = mbs * seq, m.hidden_size, dt.act
    vocab = vocab or m.vocab_size
    local_tokens = tokens / tp if sp else tokens
    fwd, bwd = Pass(), Pass(backward=True)
    fwd.mem(tokens * h * e * 2)                                       # gather rows
    if tp > 1:   # under SP with learned positions the runtime and Megatron-Core all-reduce, then split: not priced
        fwd.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", tokens * h * e))
    if m.position_embedding == "learned":
        fwd.mem(local_tokens * h * e * 3)
    if m.dropout > 0:
        fwd.mem(local_tokens * h * (2 * e + 1))
    if tp > 1 and sp:
        bwd.collectives.append(Collective("all_gather", tokens * h * e))
    bwd.mem(tokens * h * (e + FP32) + vocab / tp * h * FP32)         # scatter-add into the fp32 grad
    return fwd, bwd


def cross_entropy_work(tokens: float, vocab: float, tp: int, e: int, fused: bool) -> tuple[Pass, Pass]:
    """The loss over one rank's [tokens, vocab] logits shard (vocab already divided by tp), in fp32.
    Fused: Megatron's vocab_parallel_cross_entropy (cast, max, exp, sum, log-softmax; backward softmax -
    one-hot, cast). Eager, tp 1: F.cross_entropy(logits.float()): cast, log_softmax, an NLL gather; backward
    zero fill (+ a scatter of one element per token), log_softmax backward, cast. Eager, tp > 1: torch's
    loss_parallel (torch/distributed/tensor/parallel/loss.py) decomposes the log-softmax over the shard: cast,
    amax, x - max, exp, sum, - log-sum-exp, gather; backward zero fill (+ scatter), exp, mul, add, cast.
    With tp > 1: the max, sum-exp and target-logit all-reduces over the shards, b*s fp32 each."""
    fwd, bwd = Pass(), Pass(backward=True)
    logits = tokens * vocab
    if fused:
        fwd.chain(logits * (e + FP32), logits * FP32, logits * 2 * FP32, logits * FP32, logits * 2 * FP32)
        bwd.mem(logits * (FP32 + e))                                  # softmax - one-hot, cast
    else:
        cast = [logits * (e + FP32)] if e < FP32 else []               # .float() copies 16-bit logits only
        if tp == 1:
            fwd.chain(*cast, logits * 2 * FP32, tokens * FP32)                     # log_softmax, nll
            bwd.chain(logits * FP32, logits * 3 * FP32, *cast)                     # fill, log_softmax
        else:
            fwd.chain(*cast, logits * FP32, logits * 2 * FP32, logits * 2 * FP32,  # amax, sub, exp,
                      logits * FP32, logits * 2 * FP32, tokens * FP32)             # sum, sub, gather
            bwd.chain(logits * FP32, logits * 2 * FP32, logits * 2 * FP32,         # fill, exp, mul,
                      logits * 3 * FP32, *cast)                                    # add
    if tp > 1:
        fwd.collectives += [Collective("all_reduce", tokens * FP32)] * 3
    return fwd, bwd


def head_work(m: ModelSpec, mbs: int, seq: int, tp: int, sp: bool, dt: Dtypes, opts: KernelOptions = MEGATRON,
              vocab: int | None = None) -> tuple[Pass, Pass]:
    """Final norm, logits GEMM and the loss (`cross_entropy_work`)."""
    tokens, h, e = mbs * seq, m.hidden_size, dt.act
    vocab = (vocab or m.vocab_size) / tp
    local_tokens = tokens / tp if sp else tokens
    fwd, bwd = Pass(), Pass(backward=True)
    _norm(fwd, bwd, m, local_tokens * h, dt.residual, FP32 if dt.autocast else e, "norm" in opts.fused)
    if dt.autocast:
        fwd.mem(tokens * h * (FP32 + e))                              # autocast input cast
    if tp > 1 and sp:
        fwd.collectives.append(Collective("all_gather", tokens * h * e))
    fwd.gemm(tokens, vocab, h, e)                                     # logits
    loss_fwd, loss_bwd = cross_entropy_work(tokens, vocab, tp, e, "cross_entropy" in opts.fused)
    fwd.extend(loss_fwd)
    bwd.extend(loss_bwd)
    bwd.gemm(tokens, h, vocab, e)                                     # d input
    bwd.gemm(h, vocab, tokens, e)                                     # d weight
    if tp > 1:
        bwd.collectives.append(Collective("reduce_scatter" if sp else "all_reduce", tokens * h * e))
    return fwd, bwd
