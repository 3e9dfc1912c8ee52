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


def model_from_hf_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Map Hugging Face keys onto ModelSpec fields (validated by the caller)."""
    name = data.get("_name_or_path") or data.get("model_type") or "hf-model"
    if "n_layer" in data:  # GPT-2 family
        act = data.get("activation_function", "gelu_new")
        if act not in _GELU_ACTS:
            raise InputError(f"activation_function '{act}' is not supported (one of {sorted(_GELU_ACTS)})",
                             field=source)
        dropout = max(float(data.get(k, 0.0) or 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        return dict(name=name, num_layers=_need(data, "n_layer", source), hidden_size=_need(data, "n_embd", source),
                    num_heads=_need(data, "n_head", source), ffn_hidden_size=data.get("n_inner"),
                    vocab_size=_need(data, "vocab_size", source),
                    max_position_embeddings=data.get("n_positions", 1024),
                    tied_embeddings=data.get("tie_word_embeddings", True), norm="layernorm", mlp="gelu",
                    bias=True, position_embedding="learned", norm_eps=data.get("layer_norm_epsilon", 1e-5),
                    dropout=dropout)
    act = data.get("hidden_act", "silu")
    if act not in _SWIGLU_ACTS:
        raise InputError(f"hidden_act '{act}' is not supported (one of {sorted(_SWIGLU_ACTS)})", field=source)
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
                dropout=float(data.get("attention_dropout", 0.0) or 0.0))


def validated(fields: dict[str, Any], source: str) -> ModelSpec:
    from pydantic import ValidationError

    from planner.errors import first_pydantic_error
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        raise first_pydantic_error(exc, source) from None
