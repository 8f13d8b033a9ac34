"""Architecture readers: a Hugging Face ``config.json`` and tensor names, mapped to canonical ones.

Adding an architecture is one entry in ``ARCHITECTURES`` (plus its test) as long as it is a
Llama-family decoder; anything the runtime cannot run is refused here, by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from formats.config import ModelConfig, RopeScaling
from formats.errors import FormatError

_LLAMA_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attention.wq.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attention.wk.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attention.wv.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "feed_forward.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "feed_forward.w_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "feed_forward.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Tensors a checkpoint may carry that the runtime recomputes; ignored without a warning.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Architecture:
    qkv_bias: bool  # Qwen2 carries q/k/v biases
    names: dict[str, str]

    def hf_name(self, canonical: str) -> str:
        m = _LAYER.match(canonical)
        if m:
            return self.names[m.group(2)].format(i=m.group(1))
        return self.names[canonical]


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(qkv_bias=False, names=_LLAMA_NAMES),
    "MistralForCausalLM": Architecture(qkv_bias=False, names=_LLAMA_NAMES),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True, names=_LLAMA_NAMES),
}


def architecture_of(hf: dict[str, Any], where: str) -> tuple[str, Architecture]:
    archs = hf.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise FormatError(f"{where}: architectures {archs} is not supported; supported: {supported}")
    return archs[0], ARCHITECTURES[archs[0]]


def model_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """Normalize a transformers-4 or -5 style config.json into the manifest's ModelConfig."""
    name, arch = architecture_of(hf, where)
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag) and not (arch.qkv_bias and flag == "attention_bias"):
            raise FormatError(f"{where}: {flag}=true is not supported (biases on o_proj/MLP); "
                              "supported: Llama/Mistral without biases, Qwen2 with q/k/v biases")
    heads = _req(hf, "num_attention_heads", where)
    hidden = _req(hf, "hidden_size", where)
    theta, scaling = _rope(hf, where)
    eos = hf.get("eos_token_id")
    return ModelConfig(
        architecture=name,
        num_layers=_req(hf, "num_hidden_layers", where),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=_req(hf, "intermediate_size", where),
        vocab_size=_req(hf, "vocab_size", where),
        max_position_embeddings=_req(hf, "max_position_embeddings", where),
        rms_norm_eps=float(_req(hf, "rms_norm_eps", where)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch.qkv_bias,
        sliding_window=_sliding_window(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
    )


def declared_dtype(hf: dict[str, Any]) -> str | None:
    """The dtype config.json declares (``torch_dtype`` in transformers 4, ``dtype`` in 5)."""
    d = hf.get("dtype") or hf.get("torch_dtype")
    return str(d).removeprefix("torch.") if d else None


def _req(hf: dict[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise FormatError(f"{where}: required field {key!r} is missing")
    return hf[key]


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """rope_theta/rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = hf.get("rope_theta", params.pop("rope_theta", None))
    scaling = hf.get("rope_scaling") or (params if params else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = RopeScaling("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    elif rope_type == "linear":
        scaling = RopeScaling("linear", float(scaling["factor"]))
    else:
        raise FormatError(f"{where}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    return float(theta if theta is not None else 10000.0), scaling


def _sliding_window(hf: dict[str, Any]) -> int | None:
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None  # Qwen2 declares a window it does not use
    window = hf.get("sliding_window")
    return int(window) if window else None
