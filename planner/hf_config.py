"""Read a Hugging Face `config.json` into a ModelSpec: GPT-2, Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3
(dense and MoE), Gemma 2, Gemma 3 (text), Llama 4 (text), DeepSeek-V2 and DeepSeek-V3 key names.

The rule: every key either is modelled (read into a ModelSpec field), changes nothing meshplan counts
(`_NEUTRAL`, each group with its reason), or is refused with one line naming it. Unknown keys are refused too:
an importer that skips a key it does not know plans the wrong model without a word (Mixtral's experts, once).
"""

from __future__ import annotations

from typing import Any

from planner.errors import InputError
from planner.specs import ModelSpec

_GELU_ACTS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu"}
_SWIGLU_ACTS = {"silu", "swish"}

# Keys that change no parameter, FLOP count or memory meshplan models, by reason.
_NEUTRAL = frozenset({
    # bookkeeping, token ids, initialisation, inference-only caches
    "architectures", "model_type", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "auto_map",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "cache_implementation",
    "tokenizer_class", "pretraining_tp", "n_ctx", "use_bfloat16", "attn_implementation",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type", "summary_use_proj",
    "task_specific_params", "scale_attn_weights", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx",
    "router_aux_loss_coef", "output_router_logits", "router_z_loss_coef",
    # position scaling and attention-score scaling: elementwise, no weights
    "rope_scaling", "rope_local_base_freq", "query_pre_attn_scalar", "attn_temperature_tuning", "floor_scale",
    "attn_scale", "no_rope_layers",
    # elementwise on scores or logits (tanh soft-capping, router jitter noise, top-k renormalisation): no weights,
    # FLOPs far below the matmuls' (fused attention kernels apply soft-capping inside, FlashAttention >= 2.6)
    "attn_logit_softcapping", "final_logit_softcapping", "router_jitter_noise", "norm_topk_prob",
    # DeepSeek routing: group-limited top-k (n_group groups, the best topk_group of them) chooses which experts,
    # not how many; the routed output's scale; the auxiliary-loss-free bias update; sequence-wise balance loss
    "topk_method", "n_group", "topk_group", "routed_scaling_factor", "aux_loss_alpha", "seq_aux",
    # DeepSeek's inference code's expert-parallel degree (a layout, not the model: plan it with --ep); RoPE
    # channel order (interleaved pairs or halves: the same FLOPs)
    "ep_size", "rope_interleave",
    # DeepSeek-V3's multi-token prediction module (arXiv:2412.19437 Sec. 2.2): transformers' DeepseekV3 model
    # builds no MTP layer (their weights are dropped on load), and the published 671B / 37B exclude its 14B
    "num_nextn_predict_layers",
})


class _Keys:
    """A config's keys, remembering which ones were read."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data, self.source, self.used = data, source, set()

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        if key not in self.data:
            raise InputError(f"missing key '{key}' in Hugging Face config", field=self.source)
        return self.get(key)

    def number(self, key: str) -> float:
        """An optional probability / rate key (0 when absent or null)."""
        value = self.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"'{key}' must be a number (got {str(value)[:40]!r})", field=self.source)
        return float(value)

    def refuse(self, key: str, why: str) -> None:
        raise InputError(f"'{key}': {why}", field=self.source)

    def check_all_read(self, model_type: str) -> None:
        for key in self.data:
            if key not in self.used and key not in _NEUTRAL:
                self.refuse(key, f"not a key meshplan knows for model_type '{model_type}': it may change "
                                 f"parameters, FLOPs or memory (remove it if it does not)")


def is_hf_config(data: dict[str, Any]) -> bool:
    return "n_layer" in data or "num_hidden_layers" in data or "text_config" in data


def _activation(k: _Keys, key: str, default: str, known: set[str]) -> str:
    act = k.get(key, default)
    if not isinstance(act, str) or act not in known:
        raise InputError(f"{key} '{str(act)[:40]}' is not supported (one of {sorted(known)})", field=k.source)
    return act


def model_from_hf_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map Hugging Face keys onto ModelSpec fields (validated by the caller)."""
    k = _Keys(data, source)
    name = k.get("_name_or_path") or k.get("model_type") or "hf-model"
    model_type = k.get("model_type", "")
    if "vision_config" in data or "text_config" in data:
        k.refuse("vision_config" if "vision_config" in data else "text_config",
                 "a multimodal config: the vision encoder is not modelled; to plan the text model, save its "
                 "text_config object as the config file")
    if "quantization_config" in data:
        k.refuse("quantization_config", "quantized weights are not modelled")
    if model_type not in _DEEPSEEK:
        for key in ("kv_lora_rank", "q_lora_rank"):
            if key in data:
                k.refuse(key, f"multi-head latent attention is modelled for {' and '.join(_DEEPSEEK)} configs, "
                              f"not model_type '{model_type}'")
    fields = _gpt2(k, name) if "n_layer" in data else _decoder(k, name, model_type)
    k.check_all_read(model_type or "gpt2")
    return fields


def _gpt2(k: _Keys, name: str) -> dict[str, Any]:
    _activation(k, "activation_function", "gelu_new", _GELU_ACTS)
    dropout = max(k.number(key) for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
    return dict(name=name, num_layers=k.need("n_layer"), hidden_size=k.need("n_embd"),
                num_heads=k.need("n_head"), ffn_hidden_size=k.get("n_inner"), vocab_size=k.need("vocab_size"),
                max_position_embeddings=k.get("n_positions", 1024),
                tied_embeddings=k.get("tie_word_embeddings", True), norm="layernorm", mlp="gelu",
                bias=True, position_embedding="learned", norm_eps=k.get("layer_norm_epsilon", 1e-5),
                dropout=dropout)


_DEEPSEEK = ("deepseek_v2", "deepseek_v3")
_KNOWN = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3_text",
          "llama4_text", *_DEEPSEEK)


def _decoder(k: _Keys, name: str, model_type: str) -> dict[str, Any]:
    """Llama-style decoders and their descendants."""
    if model_type and model_type not in _KNOWN:
        k.refuse("model_type", f"'{model_type}' is not one meshplan imports ({', '.join(_KNOWN)})")
    gemma = model_type.startswith("gemma")
    if gemma:
        act = _activation(k, "hidden_activation", "gelu_pytorch_tanh", _GELU_ACTS)
        if "hidden_act" in k.data and k.data["hidden_act"] not in (None, act):
            _activation(k, "hidden_act", act, _GELU_ACTS)
        k.used.add("hidden_act")
        mlp = "geglu"
    else:
        _activation(k, "hidden_act", "silu", _SWIGLU_ACTS)
        mlp = "swiglu"
    heads = k.need("num_attention_heads")
    if model_type in _DEEPSEEK:
        return _deepseek(k, name, model_type, heads)
    fields = dict(
        name=name, num_layers=k.need("num_hidden_layers"), hidden_size=k.need("hidden_size"), num_heads=heads,
        num_kv_heads=k.get("num_key_value_heads") or heads, ffn_hidden_size=k.need("intermediate_size"),
        vocab_size=k.need("vocab_size"), max_position_embeddings=k.get("max_position_embeddings", 4096),
        tied_embeddings=k.get("tie_word_embeddings", gemma), norm="rmsnorm", mlp=mlp,
        bias=bool(k.get("mlp_bias", False)),
        qkv_bias=bool(k.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        position_embedding="rope", rope_theta=k.get("rope_theta", 10000.0), norm_eps=k.get("rms_norm_eps", 1e-5),
        dropout=k.number("attention_dropout"), head_dim=k.get("head_dim"))
    if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
        fields["qk_norm"] = "rmsnorm"
    if model_type == "llama4_text" and k.get("use_qk_norm", False):
        fields["qk_norm"] = "l2"
    if gemma:
        fields["sandwich_norm"] = True
    fields.update(_window(k, model_type, fields["num_layers"]))
    fields.update(_moe(k, model_type, fields))
    if model_type == "llama4_text":
        fields["attention_chunk"] = k.get("attention_chunk_size")
    return fields


def _window(k: _Keys, model_type: str, layers: int) -> dict[str, Any]:
    """Sliding-window attention: Mistral / Mixtral in every layer, Gemma 2 in every other, Gemma 3 in five of
    six; Qwen's optional windowed layers are refused."""
    if model_type.startswith("qwen"):
        if k.get("use_sliding_window", False):
            k.refuse("use_sliding_window", "Qwen's windowed layers (from max_window_layers on) are not modelled")
        k.used.update({"sliding_window", "max_window_layers"})      # inert without use_sliding_window
        return {}
    types = k.get("layer_types")
    window = k.get("sliding_window")
    if types is not None:
        kinds = set(types)
        if not kinds <= {"sliding_attention", "full_attention"} or len(types) != layers:
            k.refuse("layer_types", f"expected {layers} entries of sliding_attention / full_attention")
        if "sliding_attention" not in kinds:
            return {}
        globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
        every = globals_[0] + 1 if globals_ else None
        if every is not None and globals_ != list(range(every - 1, layers, every)):
            k.refuse("layer_types", "full-attention layers that do not repeat every n-th layer are not modelled")
        k.used.add("sliding_window_pattern")
        return dict(sliding_window=window, global_every=every) if window else {}
    if model_type == "gemma2":
        k.used.add("sliding_window_size")          # an older name of sliding_window
        return dict(sliding_window=window, global_every=2) if window else {}
    if model_type == "gemma3_text":
        pattern = k.get("sliding_window_pattern", 6)
        return dict(sliding_window=window, global_every=pattern) if window else {}
    if window and model_type in ("llama", "llama4_text"):
        k.refuse("sliding_window", f"'{model_type}' has no sliding-window attention")
    return dict(sliding_window=window) if window else {}


def _moe(k: _Keys, model_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Mixture-of-experts keys of Mixtral, Qwen2-MoE, Qwen3-MoE and Llama 4."""
    if model_type == "mixtral":
        # every layer routes; an expert is a SwiGLU MLP of intermediate_size
        return dict(moe=dict(num_experts=k.need("num_local_experts"), top_k=k.need("num_experts_per_tok"),
                             expert_ffn_size=fields["ffn_hidden_size"]))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        moe = dict(num_experts=k.need("num_experts"), top_k=k.need("num_experts_per_tok"),
                   expert_ffn_size=k.need("moe_intermediate_size"), every=k.get("decoder_sparse_step", 1))
        dense = k.get("mlp_only_layers", [])
        if dense != list(range(len(dense))):
            k.refuse("mlp_only_layers", "dense layers other than the first n are not modelled")
        moe["first_dense_layers"] = len(dense)
        if model_type == "qwen2_moe":
            shared = k.get("shared_expert_intermediate_size", 0)
            if shared:
                moe.update(shared_experts=1, shared_ffn_size=shared, shared_expert_gate=True)
        return dict(moe=moe)
    if model_type == "llama4_text":
        every = k.get("interleave_moe_layer_step", 1)
        layers = fields["num_layers"]
        listed = k.get("moe_layers")
        if listed is not None and list(listed) != [i for i in range(layers) if (i + 1) % every == 0]:
            k.refuse("moe_layers", f"MoE layers other than every {every}-th are not modelled")
        dense_width = k.get("intermediate_size_mlp", fields["ffn_hidden_size"])
        expert = fields["ffn_hidden_size"]
        fields["ffn_hidden_size"] = dense_width
        return dict(moe=dict(num_experts=k.need("num_local_experts"), top_k=k.need("num_experts_per_tok"),
                             expert_ffn_size=expert, shared_experts=1, shared_ffn_size=expert, every=every,
                             router="sigmoid"))
    return {}


def _deepseek(k: _Keys, name: str, model_type: str, heads: int) -> dict[str, Any]:
    """DeepSeek-V2 / V3 (transformers' DeepseekV2/V3 configs): latent attention, a dense MLP of intermediate_size
    in the first first_k_dense_replace layers, then routed experts of moe_intermediate_size with
    n_shared_experts shared ones (one MLP of n_shared_experts x moe_intermediate_size: the same weights)."""
    _activation(k, "hidden_act", "silu", _SWIGLU_ACTS)
    for key in ("attention_bias", "mlp_bias"):
        if k.get(key, False):
            k.refuse(key, "biases in DeepSeek's projections are not modelled")
    kv = k.get("num_key_value_heads", heads)
    if kv != heads:
        k.refuse("num_key_value_heads", f"latent attention has a key and value per head ({heads}), got {kv}")
    rope = k.need("qk_rope_head_dim")
    if k.get("head_dim", rope) != rope:       # transformers sets head_dim to the rope width (its RoPE tables')
        k.refuse("head_dim", f"expected qk_rope_head_dim {rope} (transformers' convention for DeepSeek)")
    fields = dict(
        name=name, num_layers=k.need("num_hidden_layers"), hidden_size=k.need("hidden_size"), num_heads=heads,
        ffn_hidden_size=k.need("intermediate_size"), vocab_size=k.need("vocab_size"),
        max_position_embeddings=k.get("max_position_embeddings", 4096),
        tied_embeddings=k.get("tie_word_embeddings", False), norm="rmsnorm", mlp="swiglu", bias=False,
        qkv_bias=False, position_embedding="rope", rope_theta=k.get("rope_theta", 10000.0),
        norm_eps=k.get("rms_norm_eps", 1e-6), dropout=k.number("attention_dropout"),
        mla=dict(kv_lora_rank=k.need("kv_lora_rank"), q_lora_rank=k.get("q_lora_rank"),
                 qk_nope_head_dim=k.need("qk_nope_head_dim"), qk_rope_head_dim=rope, v_head_dim=k.need("v_head_dim")))
    experts = k.get("n_routed_experts")
    if experts:
        if k.get("moe_layer_freq", 1) != 1:
            k.refuse("moe_layer_freq", "MoE layers other than every layer after first_k_dense_replace are not "
                                       "modelled")
        scoring = k.get("scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            k.refuse("scoring_func", f"'{str(scoring)[:40]}' is not a router meshplan models (softmax, sigmoid)")
        shared = k.get("n_shared_experts", 0)
        fields["moe"] = dict(num_experts=experts, top_k=k.need("num_experts_per_tok"),
                             expert_ffn_size=k.need("moe_intermediate_size"), shared_experts=shared,
                             first_dense_layers=k.get("first_k_dense_replace", 0), router=scoring)
    else:
        k.used.update({"num_experts_per_tok", "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace",
                       "moe_layer_freq", "scoring_func"})    # inert without routed experts
    return fields


def validated(fields: dict[str, Any], source: str) -> ModelSpec:
    from pydantic import ValidationError

    from planner.errors import first_pydantic_error
    from planner.limits import check_spec
    try:
        spec = ModelSpec(**fields)
    except ValidationError as exc:
        raise first_pydantic_error(exc, source) from None
    check_spec(spec, source)
    return spec
