"""Read a Hugging Face `config.json` (GPT-2, Llama, Mistral, Qwen2 key names) into a ModelSpec."""

from __future__ import annotations

from typing import Any

from planner.errors import InputError
from planner.specs import ModelSpec

_GELU_ACTS = {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu"}
_SWIGLU_ACTS = {"silu", "swish"}


def is_hf_config(data: dict[str, Any]) -> bool:
    return "n_layer" in data or "num_hidden_layers" in data


def _need(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data:
        raise InputError(f"missing key '{key}' in Hugging Face config", field=source)
    return data[key]


def _number(data: dict[str, Any], key: str, source: str) -> float:
    """An optional probability / rate key (0 when absent or null)."""
    value = data.get(key) or 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"'{key}' must be a number (got {str(value)[:40]!r})", field=source)
    return float(value)


def _activation(data: dict[str, Any], key: str, default: str, known: set[str], source: str) -> str:
    act = data.get(key, default)
    if not isinstance(act, str) or act not in known:
        raise InputError(f"{key} '{str(act)[:40]}' is not supported (one of {sorted(known)})", field=source)
    return act


def model_from_hf_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map Hugging Face keys onto ModelSpec fields (validated by the caller)."""
    name = data.get("_name_or_path") or data.get("model_type") or "hf-model"
    if "n_layer" in data:  # GPT-2 family
        _activation(data, "activation_function", "gelu_new", _GELU_ACTS, source)
        dropout = max(_number(data, k, source) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        return dict(name=name, num_layers=_need(data, "n_layer", source), hidden_size=_need(data, "n_embd", source),
                    num_heads=_need(data, "n_head", source), ffn_hidden_size=data.get("n_inner"),
                    vocab_size=_need(data, "vocab_size", source),
                    max_position_embeddings=data.get("n_positions", 1024),
                    tied_embeddings=data.get("tie_word_embeddings", True), norm="layernorm", mlp="gelu",
                    bias=True, position_embedding="learned", norm_eps=data.get("layer_norm_epsilon", 1e-5),
                    dropout=dropout)
    _activation(data, "hidden_act", "silu", _SWIGLU_ACTS, source)
    model_type = data.get("model_type", "")
    heads = _need(data, "num_attention_heads", source)
    qkv_bias = bool(data.get("attention_bias", model_type == "qwen2"))
    return dict(name=name, num_layers=_need(data, "num_hidden_layers", source),
                hidden_size=_need(data, "hidden_size", source),
                num_heads=heads, num_kv_heads=data.get("num_key_value_heads") or heads,
                ffn_hidden_size=_need(data, "intermediate_size", source),
                vocab_size=_need(data, "vocab_size", source),
                max_position_embeddings=data.get("max_position_embeddings", 4096),
                tied_embeddings=data.get("tie_word_embeddings", False), norm="rmsnorm", mlp="swiglu",
                bias=bool(data.get("mlp_bias", False)), qkv_bias=qkv_bias, position_embedding="rope",
                rope_theta=data.get("rope_theta", 10000.0), norm_eps=data.get("rms_norm_eps", 1e-5),
                dropout=_number(data, "attention_dropout", source))


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
