"""Megatron-LM: a plan as `pretrain_gpt.py` arguments (args.json, args.txt), and such arguments read back.

Flag names and defaults are those of megatron-core 0.19.2's `megatron/training/arguments.py`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from planner.errors import InputError
from planner.export.common import (Adjusted, Launch, change_config, launch_script, overlaps_grad_reduce,
                                   parse_arg_list, resolved_config, shell_line, slurm_script, take_float, take_int,
                                   take_str)
from planner.hf_config import validated
from planner.layout import DEFAULT_ORDER
from planner.specs import ParallelConfig

TARGET = "megatron"
TITLE = "Megatron-LM pretrain_gpt.py"
TP_PP_DP = ("tp", "pp", "dp")              # --use-tp-pp-dp-mapping; Megatron's default is tp-dp-pp
FSDP_STRATEGY = {2: "optim_grads", 3: "optim_grads_params"}   # Megatron-FSDP's ZeRO-2 / ZeRO-3
# Flags meshplan does not model: a launch using them is refused rather than predicted wrongly.
UNMODELLED = {"--context-parallel-size": "context parallelism", "--fp8-format": "FP8 training",
              "--fp4-format": "FP4 training", "--mla-down-proj-fusion": "fused MLA down projections",
              "--hybrid-layer-pattern": "hybrid (Mamba) layers", "--use-torch-fsdp2": "torch FSDP2 inside Megatron",
              "--moe-latent-size": "MoE latent projections", "--moe-router-num-groups": "group-limited routing",
              "--moe-pad-expert-input-to-capacity": "experts padded to their capacity"}
# MoE overlaps meshplan does not model: a launch using them is predicted without them, with a note
MOE_OVERLAPS = ("--moe-shared-expert-overlap", "--overlap-moe-expert-parallel-comm")
# MoE options whose value meshplan does not model (a launch using them is refused); the values the export writes
MOE_FIXED = {"--moe-token-dispatcher-type": ("alltoall", "all-to-all token dispatch (meshplan's EP model)"),
             "--expert-tensor-parallel-size": (None, "expert tensor parallelism = tp (Megatron's default)")}


def _vocab_divisor(vocab: int, tp: int) -> int:
    """--make-vocab-size-divisible-by: Megatron pads the vocabulary to a multiple of this times tp; the
    largest power of two up to its default 128 that leaves the plan's vocabulary unpadded."""
    d = 128
    while d > 1 and vocab % (d * tp):
        d //= 2
    return d


# ---------------------------------------------------------------------------------------------- export
def nearest(plan) -> Adjusted:
    m = plan.model
    from planner.export.common import refuse_unwritten
    refuse_unwritten(m, TARGET, ("moe", "head_dim", "qk_norm", "mla"))
    if m.qk_norm == "rmsnorm" and m.norm != "rmsnorm":
        raise InputError("Megatron-LM's --qk-layernorm uses the model's --normalization: q/k RMSNorm needs "
                         "RMSNorm blocks", field="--to megatron")
    if m.moe is not None and m.bias:
        raise InputError("Megatron-LM gives routed experts biases with --add-bias-linear (only under expert "
                         "tensor parallelism 1); meshplan models bias-free experts", field="--to megatron")
    if m.bias and not m.has_qkv_bias:
        raise InputError("Megatron-LM cannot express linear biases without q/k/v biases (--add-bias-linear "
                         "turns --add-qkv-bias on)", field="--to megatron")
    cfg, training, changes = resolved_config(plan), plan.training, []
    if cfg.schedule == "gpipe":
        cfg = change_config(cfg, schedule="1f1b")
        changes.append("schedule gpipe -> 1f1b: Megatron-LM runs 1F1B or interleaved 1F1B only")
    if training.precision == "amp-bf16":
        training = training.model_copy(update={"precision": "bf16"})
        changes.append("precision amp-bf16 -> bf16: Megatron-LM keeps bf16 weights with fp32 main weights and "
                       "gradients (--bf16)")
    order = tuple(plan.config.layout)
    if order not in (DEFAULT_ORDER, TP_PP_DP):
        changes.append(f"rank order {','.join(order)} -> tp,dp,pp: Megatron-LM orders tp fastest, then dp, pp "
                       f"(or tp, pp, dp)")
        order = DEFAULT_ORDER
    if plan.config.placement is not None:
        changes.append("rank placement dropped: Megatron-LM runs global rank r on GPU r of the node list")
    return Adjusted(cfg, training, order, tuple(changes))


def moe_layer_pattern(moe, num_layers: int) -> str:
    """--moe-layer-freq: 1 when every layer is MoE, else a list expression (1 = MoE layer) in the first-k-dense
    then every-n-th form, e.g. '[0]*3+[1]*29' or '([0]*1+[1])*24' (Megatron evaluates it, digits []()+* only)."""
    if moe.first_dense_layers == 0 and moe.every == 1:
        return "1"
    k, e = min(moe.first_dense_layers, num_layers), moe.every
    if e == 1:
        return f"[0]*{k}+[1]*{num_layers - k}" if k < num_layers else f"[0]*{num_layers}"
    # after k dense layers, layer i is MoE when (i + 1) % e == 0: dense up to the next multiple, then blocks of e
    lead = next((i for i in range(k, num_layers) if (i + 1) % e == 0), num_layers)
    blocks, tail = divmod(num_layers - lead, e)
    parts = [f"[0]*{lead}"] if lead else []
    if blocks:
        parts.append(f"([1]+[0]*{e - 1})*{blocks}")
    if tail:
        parts.append(f"[1]+[0]*{tail - 1}" if tail > 1 else "[1]")
    return "+".join(parts)


def moe_args(m, ep: int) -> list[str]:
    """Mixture-of-experts flags (megatron-core 0.19.2's MoE arguments): routed experts, top-k, expert and
    shared widths, the dense/MoE layer pattern, the router's score function, all-to-all dispatch with grouped
    GEMMs, dropless unless the spec has a capacity factor, and the expert-parallel degree."""
    moe = m.moe
    args = ["--num-experts", str(moe.num_experts), "--moe-router-topk", str(moe.top_k),
            "--moe-ffn-hidden-size", str(moe.expert_ffn_size),
            "--moe-layer-freq", moe_layer_pattern(moe, m.num_layers),
            "--moe-router-score-function", moe.router, "--moe-token-dispatcher-type", "alltoall",
            "--moe-grouped-gemm", "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01",
            "--expert-model-parallel-size", str(ep)]
    if moe.shared_width:       # Megatron's shared expert is one MLP of the shared experts' total width
        args += ["--moe-shared-expert-intermediate-size", str(moe.shared_width)]
        if moe.shared_expert_gate:
            args.append("--moe-shared-expert-gate")
    if moe.capacity_factor is not None:
        args += ["--moe-expert-capacity-factor", repr(moe.capacity_factor), "--moe-token-drop-policy", "probs"]
    return args


def mla_args(mla) -> list[str]:
    """Multi-head latent attention: Megatron-Core's MLASelfAttention (its --qk-head-dim is the nope width; its
    --qk-layernorm puts the norms on the q and kv latents, which DeepSeek has)."""
    args = ["--multi-latent-attention", "--kv-lora-rank", str(mla.kv_lora_rank), "--qk-head-dim",
            str(mla.qk_nope_head_dim), "--qk-pos-emb-head-dim", str(mla.qk_rope_head_dim), "--v-head-dim",
            str(mla.v_head_dim), "--qk-layernorm"]
    return args + (["--q-lora-rank", str(mla.q_lora_rank)] if mla.q_lora_rank else [])


def _mla(a: dict, source: str) -> dict | None:
    """The mla fields of a launch with --multi-latent-attention (Megatron's defaults for the widths)."""
    if "--multi-latent-attention" not in a:
        return None
    if "--qk-layernorm" not in a:
        raise InputError("--multi-latent-attention without --qk-layernorm (no norms on the latents) is not "
                         "modelled", field=source)
    return dict(kv_lora_rank=take_int(a, "--kv-lora-rank", 32, source), q_lora_rank=take_int(a, "--q-lora-rank",
                None, source), qk_nope_head_dim=take_int(a, "--qk-head-dim", 128, source),
                qk_rope_head_dim=take_int(a, "--qk-pos-emb-head-dim", 64, source),
                v_head_dim=take_int(a, "--v-head-dim", 128, source))


def model_args(m, tp: int, seq: int, ep: int = 1) -> list[str]:
    """Model shape flags (GPT-2/3: LayerNorm, GELU, learned positions, biases, tied embeddings; Llama: RMSNorm,
    SwiGLU, RoPE, GQA, untied, no bias; Qwen2: q/k/v bias; Qwen3: head width, q/k RMSNorm; MoE: moe_args)."""
    args = ["--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size),
            "--num-attention-heads", str(m.num_heads), "--ffn-hidden-size", str(m.ffn_size),
            "--seq-length", str(seq), "--max-position-embeddings", str(m.max_position_embeddings),
            "--vocab-size", str(m.vocab_size), "--make-vocab-size-divisible-by", str(_vocab_divisor(m.vocab_size, tp))]
    if m.kv_heads != m.num_heads:
        args += ["--group-query-attention", "--num-query-groups", str(m.kv_heads)]
    if m.dim_per_head != m.hidden_size // m.num_heads:
        args += ["--kv-channels", str(m.dim_per_head)]
    if m.qk_norm != "none":
        args.append("--qk-layernorm" if m.qk_norm == "rmsnorm" else "--qk-l2-norm")
    if m.mla is not None:
        args += mla_args(m.mla)
    args += ["--normalization", "LayerNorm" if m.norm == "layernorm" else "RMSNorm", "--norm-epsilon", repr(m.norm_eps)]
    if m.mlp == "swiglu":
        args.append("--swiglu")
    if m.position_embedding == "rope":
        args += ["--position-embedding-type", "rope", "--rotary-base", str(round(m.rope_theta))]
    else:
        args += ["--position-embedding-type", "learned_absolute"]
    if not m.bias:
        args.append("--disable-bias-linear")
        if m.has_qkv_bias:
            args.append("--add-qkv-bias")
    if not m.tied_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    args += ["--hidden-dropout", repr(m.dropout), "--attention-dropout", repr(m.dropout),
             "--attention-backend", "flash" if m.attention_kernel == "flash" else "unfused"]
    return args + (moe_args(m, ep) if m.moe is not None else [])


def _layout(layers: list[int]) -> str:
    """--pipeline-model-parallel-layout: one |-separated chunk per virtual stage, E embedding, L loss."""
    chunks = [f"t*{n}" if n > 1 else "t" * n for n in layers]
    chunks[0], chunks[-1] = "E" + chunks[0], chunks[-1] + "L"
    return "|".join(chunks)


def parallel_args(plan, adj: Adjusted) -> list[str]:
    cfg, t = adj.config, adj.training
    args = ["--tensor-model-parallel-size", str(cfg.tp), "--pipeline-model-parallel-size", str(cfg.pp)]
    if adj.order == TP_PP_DP:
        args.append("--use-tp-pp-dp-mapping")
    if cfg.sp:
        args.append("--sequence-parallel")
    layers = list(cfg.layers_per_stage)
    if len(set(layers)) > 1:
        args += ["--pipeline-model-parallel-layout", _layout(layers)]
    elif cfg.vpp > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", str(layers[0])]
    args += ["--micro-batch-size", str(cfg.mbs), "--global-batch-size", str(t.global_batch)]
    if cfg.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    elif cfg.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if cfg.zero == 1:
        args.append("--use-distributed-optimizer")
    elif cfg.zero >= 2:
        args += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", FSDP_STRATEGY[cfg.zero],
                 "--ckpt-format", "fsdp_dtensor"]
    if overlaps_grad_reduce(plan):
        args.append("--overlap-grad-reduce")
    # the cost model reduces gradients block by block: one bucket holds one block's parameters
    from planner.cost.params import mean_layer_params
    args += ["--ddp-bucket-size", str(round(mean_layer_params(plan.model).per_tp_rank(cfg.tp, cfg.ep)))]
    args += {"bf16": ["--bf16"], "fp16": ["--fp16"], "fp32": []}[t.precision]
    args += {"adamw": ["--optimizer", "adam"], "adam": ["--optimizer", "adam", "--weight-decay", "0"],
             "sgd": ["--optimizer", "sgd"]}[t.optimizer]
    return args


def arguments(plan, adj: Adjusted) -> list[str]:
    return model_args(plan.model, adj.config.tp, adj.training.seq_len, adj.config.ep) + parallel_args(plan, adj)


def files(plan, adj: Adjusted) -> dict[str, str]:
    args = arguments(plan, adj)
    # Megatron-LM orders its TP/SP collectives with one CUDA stream connection; Megatron-FSDP needs more
    env = {} if adj.config.zero >= 2 else {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    command = ['"${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}/pretrain_gpt.py"',
               '${EXTRA_ARGS:---mock-data --tokenizer-type NullTokenizer --train-iters 20 --lr 1e-4}']
    return {"args.json": json.dumps(args, indent=1) + "\n", "args.txt": shell_line(args),
            "launch.sh": launch_script(plan, TITLE, command, env, args_file="args.txt"),
            "slurm.sbatch": slurm_script(plan, TITLE)}


# ---------------------------------------------------------------------------------------------- read back
def looks_like(items: list[str]) -> bool:
    return any(x.startswith(("--num-layers", "--tensor-model-parallel-size", "--micro-batch-size")) for x in items)


def _model(a: dict, source: str) -> tuple[dict, int]:
    """(ModelSpec fields, sequence length) from the shape flags, with Megatron's defaults."""
    def need(flag: str) -> int:
        value = take_int(a, flag, None, source)
        if value is None:
            raise InputError(f"no {flag} (meshplan needs the model's shape)", field=source)
        return value
    layers, hidden, heads = need("--num-layers"), need("--hidden-size"), need("--num-attention-heads")
    seq = need("--seq-length")
    if "--vocab-size" not in a:
        raise InputError("no --vocab-size (add the tokenizer's vocabulary size)", field=source)
    swiglu = "--swiglu" in a
    # Megatron's defaults (validate_args): FFN 4h, or int(8h/3 / 64) * 64 with SwiGLU; dropouts 0.1
    ffn = take_int(a, "--ffn-hidden-size", int(4 * hidden * 2 / 3 / 64) * 64 if swiglu else 4 * hidden, source)
    gqa = "--group-query-attention" in a
    norm = take_str(a, "--normalization", "LayerNorm", source)
    if norm not in ("LayerNorm", "RMSNorm"):
        raise InputError(f"--normalization {norm} is not LayerNorm or RMSNorm", field=source)
    position = take_str(a, "--position-embedding-type", "learned_absolute", source)
    if "--use-rotary-position-embeddings" in a:
        position = "rope"
    if position not in ("rope", "learned_absolute"):
        raise InputError(f"--position-embedding-type {position} is not modelled (rope, learned_absolute)",
                         field=source)
    if "--qk-layernorm" in a and norm != "RMSNorm":
        raise InputError("--qk-layernorm with LayerNorm blocks is not modelled (q/k RMSNorm is)", field=source)
    mla = _mla(a, source)
    qk_norm = ("rmsnorm" if "--qk-layernorm" in a and mla is None else "l2" if "--qk-l2-norm" in a
               else "none")
    kv_channels = take_int(a, "--kv-channels", None, source)
    hidden_dropout = take_float(a, "--hidden-dropout", 0.1, source)
    attention_dropout = take_float(a, "--attention-dropout", 0.1, source)
    backend = take_str(a, "--attention-backend", "auto", source)
    bias = "--disable-bias-linear" not in a
    return dict(name=f"megatron-{layers}l-{hidden}h", num_layers=layers, hidden_size=hidden, num_heads=heads,
                num_kv_heads=take_int(a, "--num-query-groups", 1, source) if gqa else heads,
                ffn_hidden_size=ffn, vocab_size=take_int(a, "--vocab-size", None, source),
                max_position_embeddings=take_int(a, "--max-position-embeddings", seq, source),
                tied_embeddings="--untie-embeddings-and-output-weights" not in a,
                norm="layernorm" if norm == "LayerNorm" else "rmsnorm", mlp="swiglu" if swiglu else "gelu",
                bias=bias, qkv_bias=bias or "--add-qkv-bias" in a,
                position_embedding="rope" if position == "rope" else "learned",
                rope_theta=take_float(a, "--rotary-base", 10000.0, source),
                norm_eps=take_float(a, "--norm-epsilon", 1e-5, source),
                dropout=max(hidden_dropout, attention_dropout),
                attention_kernel="eager" if backend in ("unfused", "local") else "flash", qk_norm=qk_norm,
                head_dim=kv_channels if kv_channels not in (None, hidden // heads) else None,
                moe=_moe(a, layers, ffn, bias, source), mla=mla), seq


def _pattern(text: str, num_layers: int, source: str) -> list[int]:
    """--moe-layer-freq: an integer N (layer i is MoE when i % N == 0) or a list expression of 0/1 made of
    [..], +, * and parentheses (evaluated here without eval)."""
    import ast
    if re.fullmatch(r"\d+", text):
        n = int(text)
        if n < 1:
            raise InputError("--moe-layer-freq must be >= 1", field=source)
        return [1 if i % n == 0 else 0 for i in range(num_layers)]

    def value(node):
        if isinstance(node, ast.List):
            return [value(x) for x in node.elts]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError
    try:
        if re.search(r"[^,\d\[\]()+* ]", text):
            raise ValueError
        pattern = value(ast.parse(text, mode="eval").body)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        raise InputError(f"--moe-layer-freq '{text}' is not an integer or a list expression of 0 and 1",
                         field=source) from None
    if not isinstance(pattern, list) or len(pattern) != num_layers or set(pattern) - {0, 1}:
        raise InputError(f"--moe-layer-freq '{text}' is not a list of {num_layers} zeros and ones", field=source)
    return pattern


def _dense_then_every(pattern: list[int]) -> tuple[int, int] | None:
    """(first_dense_layers, every) of meshplan's form (the first k layers dense, then layer i MoE when
    (i + 1) % every == 0) giving `pattern`, the smallest such k; None when no form does."""
    ones = [i for i, x in enumerate(pattern) if x]
    if not ones:
        return len(pattern), 1
    first = ones[0]
    periods = [ones[1] - first] if len(ones) > 1 else [d for d in range(1, first + 2) if (first + 1) % d == 0]
    for e in periods:
        k = max(0, first - e + 1)
        if (first + 1) % e == 0 and pattern == [1 if i >= k and (i + 1) % e == 0 else 0 for i in range(len(pattern))]:
            return k, e
    return None


def _moe(a: dict, layers: int, ffn: int, bias: bool, source: str) -> dict | None:
    """MoESpec fields from the MoE flags (None without --num-experts), with megatron-core's defaults."""
    experts = take_int(a, "--num-experts", None, source)
    if experts in (None, 0):
        return None
    for flag, (written, what) in MOE_FIXED.items():
        if flag in a and take_str(a, flag, None, source) != written:
            raise InputError(f"{flag} {' '.join(a[flag])}: meshplan models {what}", field=source)
    if bias:
        raise InputError("--num-experts with linear biases: meshplan models bias-free experts", field=source)
    pattern = _pattern(take_str(a, "--moe-layer-freq", "1", source), layers, source)
    form = _dense_then_every(pattern)
    if form is None:
        raise InputError(f"--moe-layer-freq {''.join(map(str, pattern))}: meshplan models the first k layers "
                         f"dense, then every n-th layer MoE", field=source)
    router = take_str(a, "--moe-router-score-function", "softmax", source)
    if router not in ("softmax", "sigmoid"):
        raise InputError(f"--moe-router-score-function {router} is not modelled (softmax, sigmoid)", field=source)
    shared = take_int(a, "--moe-shared-expert-intermediate-size", None, source)
    capacity = take_float(a, "--moe-expert-capacity-factor", -1.0, source)
    return dict(num_experts=experts, top_k=take_int(a, "--moe-router-topk", 2, source),
                expert_ffn_size=take_int(a, "--moe-ffn-hidden-size", ffn, source),
                shared_experts=1 if shared else 0, shared_ffn_size=shared or None,
                shared_expert_gate=bool(shared) and "--moe-shared-expert-gate" in a,
                first_dense_layers=form[0], every=form[1], router=router,
                capacity_factor=capacity if capacity > 0 else None)   # Megatron: < 0 or absent = dropless


def _layers_per_chunk(a: dict, layers: int, pp: int, source: str) -> tuple[list[int], int]:
    """(blocks per chunk in pipeline order, vpp) from the layout, virtual-stage or first/last-stage flags."""
    layout = take_str(a, "--pipeline-model-parallel-layout", None, source)
    if layout is not None:
        chunks = [c.strip() for c in layout.replace(" ", "").split("|")]
        counts = []
        for c in chunks:
            n, i = 0, 0
            while i < len(c):
                sym = c[i]
                j = i + 1
                if c[j:j + 1] == "*":
                    k = j + 1
                    while k < len(c) and c[k].isdigit():
                        k += 1
                    reps, j = int(c[j + 1:k] or "0"), k
                else:
                    reps = 1
                if sym == "t":
                    n += reps
                elif sym not in "EL":
                    raise InputError(f"layout symbol '{sym}' is not modelled (t, E, L)",
                                     field=f"{source}: --pipeline-model-parallel-layout")
                i = j
            counts.append(n)
        if len(counts) % pp or sum(counts) != layers:
            raise InputError(f"layout '{layout}' has {len(counts)} chunks with {sum(counts)} layers; pp {pp}, "
                             f"{layers} layers", field=f"{source}: --pipeline-model-parallel-layout")
        if not (chunks[0].startswith("E") and chunks[-1].endswith("L")):
            raise InputError("meshplan models the embedding on the first chunk and the loss on the last",
                             field=f"{source}: --pipeline-model-parallel-layout")
        return counts, len(counts) // pp
    per_virtual = take_int(a, "--num-layers-per-virtual-pipeline-stage", None, source)
    virtual = take_int(a, "--num-virtual-stages-per-pipeline-rank", None, source)
    first = take_int(a, "--decoder-first-pipeline-num-layers", None, source)
    last = take_int(a, "--decoder-last-pipeline-num-layers", None, source)
    if per_virtual is not None:
        if layers % (pp * per_virtual):
            raise InputError(f"{layers} layers do not split into {pp} stages of chunks of {per_virtual}",
                             field=f"{source}: --num-layers-per-virtual-pipeline-stage")
        vpp = layers // (pp * per_virtual)
        return [per_virtual] * (pp * vpp), vpp
    vpp = virtual or 1
    stage = [None] * pp
    if first is not None:
        stage[0] = first
    if last is not None:
        stage[-1] = last
    rest = layers - sum(n for n in stage if n is not None)
    middle = [i for i in range(pp) if stage[i] is None]
    if middle and rest % len(middle) or (not middle and rest):
        raise InputError(f"{layers} layers do not split over {pp} stages with first {first}, last {last}",
                         field=source)
    for i in middle:
        stage[i] = rest // len(middle)
    if any(n % vpp for n in stage):
        raise InputError(f"stage layers {stage} do not split into {vpp} virtual stages", field=source)
    return [stage[j % pp] // vpp for j in range(pp * vpp)], vpp


def read(items: list[str], source: str, world_size: int) -> Launch:
    """Megatron-LM arguments (pretrain_gpt.py's) -> Launch; data, tokenizer, logging flags are ignored."""
    a = parse_arg_list(items)
    for flag, what in UNMODELLED.items():
        value = a.get(flag)
        if value is not None and value not in (["1"], ["0"]):
            raise InputError(f"{flag}: {what} is not modelled by meshplan", field=source)
    tp = take_int(a, "--tensor-model-parallel-size", 1, source)
    pp = take_int(a, "--pipeline-model-parallel-size", 1, source)
    model_fields, seq = _model(a, source)
    model = validated(model_fields, source)
    if world_size % (tp * pp):
        raise InputError(f"tp {tp} x pp {pp} does not divide the world size {world_size}", field=source)
    dp = world_size // (tp * pp)
    layers, vpp = _layers_per_chunk(a, model.num_layers, pp, source)
    mbs = take_int(a, "--micro-batch-size", None, source)
    if mbs is None:
        raise InputError("no --micro-batch-size", field=source)
    global_batch = take_int(a, "--global-batch-size", mbs * dp, source)   # Megatron's default: mbs x dp
    notes = []
    granularity = take_str(a, "--recompute-granularity", "selective" if "--recompute-activations" in a else None,
                           source)
    method, count = take_str(a, "--recompute-method", None, source), take_int(a, "--recompute-num-layers", 1, source)
    notes += [f"{flag} is modelled without that overlap (the all-to-alls and shared experts run in sequence)"
              for flag in MOE_OVERLAPS if flag in a and model.moe is not None]
    if granularity == "full" and (method == "block" or count != 1):
        notes.append(f"--recompute-method {method} --recompute-num-layers {count} is modelled as full "
                     f"recomputation of every layer")
    if "--use-megatron-fsdp" in a:
        strategy = take_str(a, "--data-parallel-sharding-strategy", "optim_grads_params", source)
        zero = {"no_shard": 0, "optim": 1, "optim_grads": 2, "optim_grads_params": 3}.get(strategy)
        if zero is None:
            raise InputError(f"--data-parallel-sharding-strategy {strategy} is not one of no_shard, optim, "
                             f"optim_grads, optim_grads_params", field=source)
    else:
        zero = 1 if "--use-distributed-optimizer" in a else 0
    optimizer = take_str(a, "--optimizer", "adam", source)
    if optimizer not in ("adam", "sgd"):
        raise InputError(f"--optimizer {optimizer} is not modelled (adam, sgd)", field=source)
    if optimizer == "adam":
        optimizer = "adam" if take_float(a, "--weight-decay", 0.01, source) == 0 else "adamw"
    precision = "bf16" if "--bf16" in a else "fp16" if "--fp16" in a else "fp32"
    ep = take_int(a, "--expert-model-parallel-size", 1, source)
    cfg_fields = dict(tp=tp, pp=pp, dp=dp, ep=ep, vpp=vpp, mbs=mbs, zero=zero,
                      recompute={"full": "full", "selective": "selective", None: "none"}[granularity],
                      sp="--sequence-parallel" in a and tp > 1, schedule="interleaved" if vpp > 1 else "1f1b",
                      layers_per_stage=layers)
    from planner.loaders import parse_spec
    cfg = parse_spec(ParallelConfig, cfg_fields, source)
    return Launch(target=TARGET, source=source, model=model, config=cfg, global_batch=global_batch, seq_len=seq,
                  precision=precision, optimizer=optimizer, overlap_grad_reduce="--overlap-grad-reduce" in a,
                  order=TP_PP_DP if "--use-tp-pp-dp-mapping" in a else DEFAULT_ORDER, notes=notes)


def read_dir(directory: Path) -> list[str] | None:
    """The argument list of an export directory (args.json, else args.txt), or None."""
    from planner.export.common import read_arg_file
    for name in ("args.json", "args.txt"):
        if (directory / name).is_file():
            return read_arg_file(directory / name)
    return None
