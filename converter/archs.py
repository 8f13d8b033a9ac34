"""Architecture readers: a Hugging Face ``config.json`` and tensor names, mapped to canonical ones.

Adding an architecture is one entry in ``ARCHITECTURES`` (plus its test) as long as it is a
Llama-family decoder; anything the runtime cannot run is refused here, by name. Every config.json
value read is checked for type and range against one table (``converter.config_values``) before it is used.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from converter.config_values import ROPE_REQUIRED, check_config, show
from formats.config import ModelConfig, MoeConfig, RopeScaling
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
_QWEN3_NAMES = {
    **_LLAMA_NAMES,
    "attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
_BAICHUAN_NAMES = {
    **_LLAMA_NAMES,
    "attention.wq.weight": "model.layers.{i}.self_attn.W_pack.weight#q",
    "attention.wk.weight": "model.layers.{i}.self_attn.W_pack.weight#k",
    "attention.wv.weight": "model.layers.{i}.self_attn.W_pack.weight#v",
}
_INTERNLM2_NAMES = {
    "tok_embeddings.weight": "model.tok_embeddings.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
    "attention_norm.weight": "model.layers.{i}.attention_norm.weight",
    "attention.wq.weight": "model.layers.{i}.attention.wqkv.weight#q",
    "attention.wk.weight": "model.layers.{i}.attention.wqkv.weight#k",
    "attention.wv.weight": "model.layers.{i}.attention.wqkv.weight#v",
    "attention.wo.weight": "model.layers.{i}.attention.wo.weight",
    "ffn_norm.weight": "model.layers.{i}.ffn_norm.weight",
    "feed_forward.w_gate.weight": "model.layers.{i}.feed_forward.w1.weight",
    "feed_forward.w_up.weight": "model.layers.{i}.feed_forward.w3.weight",
    "feed_forward.w_down.weight": "model.layers.{i}.feed_forward.w2.weight",
}
_GEMMA3_NAMES = {
    **_QWEN3_NAMES,
    "post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "post_ffn_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
# Mixture-of-experts layers: the router and each expert's three linears ({e}: the expert). Per-expert tensors
# are how transformers 4 and 5 save; a fused checkpoint (transformers 5's in-memory layout, saved as is)
# holds 3-D ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I): ``NAME@{e}:0`` names
# expert e's gate rows of the first, ``:1`` its up rows, ``NAME@{e}`` its slice of the second.
_QWEN3_MOE_NAMES = {
    **_QWEN3_NAMES,
    "feed_forward.router.weight": "model.layers.{i}.mlp.gate.weight",
    "feed_forward.experts.{e}.w_gate.weight": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "feed_forward.experts.{e}.w_up.weight": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "feed_forward.experts.{e}.w_down.weight": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
}
_MIXTRAL_NAMES = {
    **_LLAMA_NAMES,
    "feed_forward.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
    "feed_forward.experts.{e}.w_gate.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
    "feed_forward.experts.{e}.w_up.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
    "feed_forward.experts.{e}.w_down.weight": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
}
_FUSED_EXPERT_NAMES = {
    "feed_forward.router.weight": "model.layers.{i}.mlp.gate.weight",
    "feed_forward.experts.{e}.w_gate.weight": "model.layers.{i}.mlp.experts.gate_up_proj@{e}:0",
    "feed_forward.experts.{e}.w_up.weight": "model.layers.{i}.mlp.experts.gate_up_proj@{e}:1",
    "feed_forward.experts.{e}.w_down.weight": "model.layers.{i}.mlp.experts.down_proj@{e}",
}
_EXPERT = re.compile(r"^feed_forward\.experts\.(\d+)\.(.+)$")
# Tensors a checkpoint may carry that the runtime recomputes; ignored without a warning.
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Architecture:
    qkv_bias: bool  # Qwen2 carries q/k/v biases
    names: dict[str, str]
    qk_norm: bool = False  # Qwen3 normalises each head of q and k before RoPE
    # How a fused q/k/v tensor ("...#q" names above) holds the canonical q, k, v rows (``fused``)
    qkv_layout: str | None = None  # "stacked": [q; k; v] (Baichuan), "grouped": per KV head [q.., k, v] (InternLM2)
    normalize_lm_head: bool = False  # Baichuan2's NormHead: lm_head rows are L2-normalised at inference
    gemma: bool = False  # Gemma 3: (1 + w) norms, sandwich norms, GeGLU, scaled embeddings, local/global layers
    moe: str | None = None  # "qwen3" or "mixtral": which config fields say where the experts are

    def hf_name(self, canonical: str) -> str:
        """The checkpoint's name for a canonical tensor; rows of a fused tensor are ``NAME#q`` / ``#k`` / ``#v``."""
        m = _LAYER.match(canonical)
        if not m:
            return self.names[canonical]
        e = _EXPERT.match(m.group(2))
        if e:
            return self.names["feed_forward.experts.{e}." + e.group(2)].format(i=m.group(1), e=e.group(1))
        return self.names[m.group(2)].format(i=m.group(1))


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(qkv_bias=False, names=_LLAMA_NAMES),
    "MistralForCausalLM": Architecture(qkv_bias=False, names=_LLAMA_NAMES),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True, names=_LLAMA_NAMES),
    "Qwen3ForCausalLM": Architecture(qkv_bias=False, names=_QWEN3_NAMES, qk_norm=True),
    # Remote-code families (no transformers class): Baichuan-7B / Baichuan2-7B (RoPE) and InternLM2 / 2.5.
    "BaiChuanForCausalLM": Architecture(qkv_bias=False, names=_BAICHUAN_NAMES, qkv_layout="stacked"),
    "BaichuanForCausalLM": Architecture(qkv_bias=False, names=_BAICHUAN_NAMES, qkv_layout="stacked"),
    "InternLM2ForCausalLM": Architecture(qkv_bias=False, names=_INTERNLM2_NAMES, qkv_layout="grouped"),
    "Gemma3ForCausalLM": Architecture(qkv_bias=False, names=_GEMMA3_NAMES, qk_norm=True, gemma=True),
    "Qwen3MoeForCausalLM": Architecture(qkv_bias=False, names=_QWEN3_MOE_NAMES, qk_norm=True, moe="qwen3"),
    "MixtralForCausalLM": Architecture(qkv_bias=False, names=_MIXTRAL_NAMES, moe="mixtral"),
}
# Known and refused by name, with why (rather than "not supported" among the rest).
REFUSED = {
    "Qwen2MoeForCausalLM": "Qwen2-MoE adds a shared expert with its own gate to every layer, which tprun does not "
                           "run; Qwen3-MoE and Mixtral are supported",
}
BAICHUAN2_VOCAB = 125696  # Baichuan2's vocabulary: its checkpoints use NormHead (as vLLM tells them apart)


def fused_rows(layout: str, part: str, cfg: ModelConfig, start: int, stop: int) -> list[tuple[int, int]]:
    """Row ranges of a fused q/k/v tensor holding rows [start, stop) of canonical ``part`` (q, k or v)."""
    d, h, kv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    if layout == "stacked":
        base = {"q": 0, "k": h * d, "v": (h + kv) * d}[part]
        return [(base + start, base + stop)]
    group = h // kv  # InternLM2: for each KV head g, [its group of q heads; k_g; v_g]
    per = (group + 2) * d
    out = []
    for row in range(start, stop, d):  # one head at a time (splits fall on whole heads)
        head = row // d
        g, j = (head // group, head % group) if part == "q" else (head, group + (part == "v"))
        a = g * per + j * d + row % d
        out.append((a, a + min(d - row % d, stop - row)))
    return _merge(out)


def fused_shape(cfg: ModelConfig) -> tuple[int, int]:
    return ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


MULTIMODAL = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}  # image-text checkpoints: their text model
# Where their text model's tensors live: "model." of the text-only names becomes one of these prefixes
# (transformers 4 wrote language_model.model.*, transformers 5 keeps model.language_model.* in memory).
TEXT_PREFIXES = {"language_model.model.": "language_model.", "model.language_model.": ""}
SKIPPED_TOWERS = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


def text_model(hf: dict[str, Any]) -> dict[str, Any]:
    """An image-text config's text model as a text-only config (the vision tower is not served)."""
    archs = hf.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str) and archs[0] in MULTIMODAL):
        return hf
    text = dict(hf.get("text_config") or {})
    for key in ("bos_token_id", "eos_token_id"):
        if key not in text and key in hf:
            text[key] = hf[key]
    if "tie_word_embeddings" in hf:  # the outer model ties lm_head to its language model's embedding
        text["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return {**text, "architectures": [MULTIMODAL[archs[0]]], "multimodal": archs[0]}


def with_prefix(arch: Architecture, names: set[str]) -> Architecture:
    """The architecture with its tensor names moved under the text model's prefix found in ``names``."""
    for body, head in TEXT_PREFIXES.items():
        if f"{body}embed_tokens.weight" in names:
            moved = {k: (body + v.removeprefix("model.")) if v.startswith("model.") else head + v
                     for k, v in arch.names.items()}
            return dataclasses.replace(arch, names=moved)
    return arch


def architecture_of(hf: dict[str, Any], where: str) -> tuple[str, Architecture]:
    archs = hf.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    one_name = isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)
    if one_name and archs[0] in REFUSED:
        raise FormatError(f"{where}: architectures {archs}: {REFUSED[archs[0]]}")
    if not one_name or archs[0] not in ARCHITECTURES:
        raise FormatError(f"{where}: architectures {archs} is not supported; supported: {supported}")
    arch = ARCHITECTURES[archs[0]]
    if arch.qkv_layout == "stacked":
        if hf.get("max_position_embeddings") is None:  # Baichuan-13B's config: ALiBi, no positions declared
            raise FormatError(f"{where}: {archs[0]} without max_position_embeddings is Baichuan-13B, which uses ALiBi "
                              "position biases; ALiBi is not supported (Baichuan-7B and Baichuan2-7B, with RoPE, are)")
        if hf.get("vocab_size") == BAICHUAN2_VOCAB:
            arch = dataclasses.replace(arch, normalize_lm_head=True)
    if archs[0] == "InternLM2ForCausalLM" and hf.get("bias"):
        raise FormatError(f"{where}: field 'bias' is true; InternLM2 with biases on its linears is not supported")
    return archs[0], arch


def model_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """Normalize a transformers-4 or -5 style config.json into the manifest's ModelConfig."""
    name, arch = architecture_of(hf, where)
    check_config(hf, where)  # from here on every value has its type and range
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag) and not (arch.qkv_bias and flag == "attention_bias"):
            raise FormatError(f"{where}: {flag}=true is not supported (biases on o_proj/MLP); "
                              "supported: Llama/Mistral/Qwen3 without biases, Qwen2 with q/k/v biases")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    theta, scaling = _rope(_global_rope(hf) if arch.gemma else hf, where)
    eos = hf.get("eos_token_id")
    tied = hf.get("tie_word_embeddings", arch.gemma) is True
    extra = _gemma3(hf, where) if arch.gemma else _layer_types(hf, where)
    return ModelConfig(**extra,
        architecture=hf.get("multimodal") or name,  # an image-text checkpoint keeps its name (text model only)
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        rms_norm_eps=float(hf["rms_norm_eps"]),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=tied,
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        sliding_window=_sliding_window(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        moe=_moe(hf, arch, where),
    )


def _moe(hf: dict[str, Any], arch: Architecture, where: str) -> MoeConfig | None:
    """Where the experts are and how tokens pick them; values already type-checked."""
    if arch.moe is None:
        return None
    n, layers = hf["num_hidden_layers"], list(range(hf["num_hidden_layers"]))
    experts_key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    experts = hf.get(experts_key)
    if arch.moe == "qwen3":
        if hf.get("shared_expert_intermediate_size"):
            raise FormatError(f"{where}: field 'shared_expert_intermediate_size' is "
                              f"{show(hf['shared_expert_intermediate_size'])}: shared experts are not supported")
        step, dense = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or [])
        if dense - set(layers):
            raise FormatError(f"{where}: field 'mlp_only_layers' names layers {sorted(dense - set(layers))} "
                              f"beyond the model's {n}")
        layers = [i for i in layers if i not in dense and (i + 1) % step == 0]
        inter_key, norm = "moe_intermediate_size", hf.get("norm_topk_prob", False)
    else:  # Mixtral: every layer, experts as wide as intermediate_size, the two weights renormalised
        inter_key, norm = "intermediate_size", True
    for key in (experts_key, "num_experts_per_tok", inter_key):
        if hf.get(key) is None:
            raise FormatError(f"{where}: required field {key!r} is missing (a mixture-of-experts model needs it)")
    if hf["num_experts_per_tok"] > experts:
        raise FormatError(f"{where}: field 'num_experts_per_tok' is {hf['num_experts_per_tok']}, more than the "
                          f"{experts} experts ({experts_key})")
    if not layers:
        return None  # every layer dense: a plain decoder
    return MoeConfig(experts, hf["num_experts_per_tok"], hf[inter_key], norm, tuple(layers))


def with_expert_layout(arch: Architecture, cfg: ModelConfig, names: set[str]) -> Architecture:
    """The architecture reading fused 3-D expert tensors when the checkpoint stores them so."""
    if cfg.moe is None:
        return arch
    fused = _FUSED_EXPERT_NAMES["feed_forward.experts.{e}.w_down.weight"].split("@")[0]
    if fused.format(i=cfg.moe.layers[0]) not in names:
        return arch
    return dataclasses.replace(arch, names={**arch.names, **_FUSED_EXPERT_NAMES})


def fused_expert_shape(name: str, cfg: ModelConfig) -> tuple[int, int, int]:
    """The 3-D shape a fused expert tensor (``...gate_up_proj`` or ``...down_proj``) must have."""
    e, i, h = cfg.moe.num_experts, cfg.moe.intermediate_size, cfg.hidden_size
    return (e, 2 * i, h) if name.endswith("gate_up_proj") else (e, h, i)


def _global_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's full-attention RoPE as a plain config: transformers 5 keys rope_parameters by layer type."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), dict):
        return {"rope_parameters": params["full_attention"]}
    return hf


def _gemma3(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The Gemma 3 switches of ModelConfig; variants the runtime cannot run are refused by field."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise FormatError(f"{where}: field {key!r} is {show(hf[key])}: logit soft-capping is not supported "
                              "(Gemma 3 checkpoints leave it null)")
    if hf.get("use_bidirectional_attention"):
        raise FormatError(f"{where}: field 'use_bidirectional_attention' is true; only causal Gemma 3 is supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise FormatError(f"{where}: field 'hidden_activation' is {show(act)}; Gemma 3 support covers "
                          "'gelu_pytorch_tanh' (GeGLU with the tanh approximation)")
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers 4: every sliding_window_pattern-th layer is global
        pattern = hf.get("sliding_window_pattern") or 6
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise FormatError(f"{where}: field 'layer_types' must list 'sliding_attention' or 'full_attention' for each "
                          f"of the {n} layers; got {show(types)}")
    local = (hf.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict):
        if (local.get("rope_type") or "default") != "default":
            raise FormatError(f"{where}: field 'rope_parameters.sliding_attention' has rope_type "
                              f"{local.get('rope_type')!r}; sliding layers support plain RoPE only")
        local_theta = local.get("rope_theta", 10000.0)
    else:
        local_theta = hf.get("rope_local_base_freq", 10000.0)
    scalar = hf.get("query_pre_attn_scalar") or hf["head_dim"]
    return {"norm_offset": True, "sandwich_norms": True, "hidden_act": "gelu_tanh", "embed_scale": True,
            "query_scale": float(scalar) ** -0.5, "layer_types": tuple(types), "local_rope_theta": float(local_theta)}


def declared_dtype(hf: dict[str, Any]) -> str | None:
    """The dtype config.json declares (``torch_dtype`` in transformers 4, ``dtype`` in 5)."""
    d = hf.get("dtype") or hf.get("torch_dtype")
    return str(d).removeprefix("torch.") if d else None


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """rope_theta/rope_scaling (transformers 4) or rope_parameters (transformers 5); values already checked."""
    params = {k: v for k, v in (hf.get("rope_parameters") or {}).items() if k != "rope_theta"}
    theta = hf.get("rope_theta")
    if theta is None:
        theta = (hf.get("rope_parameters") or {}).get("rope_theta")
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get("rope_scaling") or params
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_REQUIRED:
        raise FormatError(f"{where}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_REQUIRED)}")
    missing = sorted(k for k in ROPE_REQUIRED[rope_type] if scaling.get(k) is None)
    if missing:
        raise FormatError(f"{where}: field {key!r} has rope_type {rope_type!r} but lacks {missing}; {rope_type} "
                          f"scaling needs {', '.join(ROPE_REQUIRED[rope_type])}")
    theta = float(theta if theta is not None else 10000.0)
    if rope_type == "default":
        return theta, None
    if rope_type in ("linear", "dynamic"):
        return theta, RopeScaling(rope_type, float(scaling["factor"]))
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    if high <= low:  # the llama3 formula divides by high - low
        raise FormatError(f"{where}: field {key!r}: high_freq_factor {high} must exceed low_freq_factor {low}")
    return theta, RopeScaling("llama3", float(scaling["factor"]), float(low), float(high),
                              scaling["original_max_position_embeddings"])


def _sliding_window(hf: dict[str, Any]) -> int | None:
    if hf.get("use_sliding_window") is False:
        return None  # Qwen2/Qwen3 declare a window they do not use
    return hf.get("sliding_window") or None  # 0 and null both mean full attention


def _layer_types(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Which layers slide, when only some do (Qwen2/Qwen3 with max_window_layers, as transformers lists them)."""
    types = hf.get("layer_types")
    if not _sliding_window(hf) or not isinstance(types, list) or len(set(map(str, types))) < 2:
        return {}
    if len(types) != hf["num_hidden_layers"] or not set(types) <= {"sliding_attention", "full_attention"}:
        raise FormatError(f"{where}: field 'layer_types' must list 'sliding_attention' or 'full_attention' for each "
                          f"of the {hf['num_hidden_layers']} layers; got {show(types)}")
    return {"layer_types": tuple(types)}
