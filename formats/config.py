"""The normalized model configuration recorded in the manifest.

The converter builds it from a Hugging Face ``config.json`` (either transformers-4 or -5
style); the runtime reads it back and needs nothing else to build the forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from formats.errors import FormatError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling; ``rope_type`` names the formula the runtime applies."""

    rope_type: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP (Qwen3-MoE, Mixtral): a softmax router picks ``top_k`` of ``num_experts``
    SwiGLU experts per token; ``layers`` are the decoder layers that have it (the others keep the dense MLP
    of ``ModelConfig.intermediate_size``)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    norm_topk_prob: bool  # the chosen experts' weights renormalised to sum to 1 (Mixtral always; Qwen3 by flag)
    layers: tuple[int, ...]
    # How the workspace shards the experts (`tpconv convert --ep`): False, every rank holds a slice of every
    # expert (tensor parallel); True, each rank holds num_experts / tp whole experts (expert parallel)
    expert_parallel: bool = False

    def experts_per_rank(self, tp: int) -> int:
        return self.num_experts // tp if self.expert_parallel else self.num_experts

    def expert_range(self, tp: int, rank: int) -> range:
        """The experts ``rank`` holds (whole or in slices)."""
        per = self.experts_per_rank(tp)
        return range(rank * per, (rank + 1) * per) if self.expert_parallel else range(per)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder, independent of tensor parallelism."""

    architecture: str  # the HF class name it came from, e.g. "LlamaForCausalLM"
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and of k, before RoPE
    sliding_window: int | None = None  # Mistral: every layer; with layer_types: the sliding layers only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma 3 (defaults: the Llama family)
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), in float32
    sandwich_norms: bool = False  # norms on the attention output and the MLP output too
    hidden_act: str = "silu"  # or "gelu_tanh" (GeGLU)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    query_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" | "full_attention"; (): all alike
    local_rope_theta: float | None = None  # RoPE base of the sliding layers (unscaled), when it differs
    # (heads, KV heads) of the checkpoint when `tpconv --pad-heads` added zero heads (formats.head_padding);
    # num_heads / num_kv_heads are then the padded counts the runtime runs with
    source_heads: tuple[int, int] | None = None
    moe: MoeConfig | None = None  # since manifest schema 8

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
        if self.source_heads is None:
            del d["source_heads"]  # manifests without padding read as before
        else:
            d["source_heads"] = list(self.source_heads)
        if self.moe is None:
            del d["moe"]  # dense manifests read as before
        else:
            d["moe"]["layers"] = list(self.moe.layers)
        return d

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.layers

    @property
    def has_dense_mlp(self) -> bool:
        """Whether any decoder layer keeps the dense MLP (so its intermediate size must split)."""
        return self.moe is None or len(self.moe.layers) < self.num_layers

    @property
    def checkpoint_heads(self) -> tuple[int, int]:
        """(query heads, KV heads) as the checkpoint stores them, before any padding."""
        return self.source_heads or (self.num_heads, self.num_kv_heads)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and (not self.layer_types
                                                    or self.layer_types[layer] == "sliding_attention")

    def window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (None: full attention)."""
        return self.sliding_window if self.is_sliding(layer) else None

    @property
    def attention_scale(self) -> float:
        return self.head_dim ** -0.5 if self.query_scale is None else self.query_scale

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest.json: model") -> ModelConfig:
        d = dict(_strict_keys(d, cls, where))
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**_strict_keys(d["rope_scaling"], RopeScaling, f"{where}.rope_scaling"))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        if d.get("source_heads") is not None:
            d["source_heads"] = _source_heads(d["source_heads"], d, where)
        if d.get("moe") is not None:
            d["moe"] = _moe(d["moe"], d.get("num_layers", 0), f"{where}.moe")
        return cls(**d)


def _source_heads(v: Any, d: dict[str, Any], where: str) -> tuple[int, int]:
    ok = (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)
          and v[0] <= d.get("num_heads", 0) and v[1] <= d.get("num_kv_heads", 0) and v[0] % v[1] == 0)
    if not ok:
        raise FormatError(f"{where}: source_heads {v!r} must be [heads, kv_heads] of the checkpoint, at most the "
                          "padded num_heads and num_kv_heads")
    return tuple(v)


def _moe(v: Any, num_layers: int, where: str) -> MoeConfig:
    d = dict(_strict_keys(v, MoeConfig, where))
    layers = d.get("layers")
    if not (isinstance(layers, list) and all(isinstance(i, int) and 0 <= i < num_layers for i in layers)
            and layers == sorted(set(layers))):
        raise FormatError(f"{where}: layers {layers!r} must list distinct decoder layers in order")
    d["layers"] = tuple(layers)
    moe = MoeConfig(**d)
    ints = (moe.num_experts, moe.top_k, moe.intermediate_size)
    if not all(isinstance(n, int) and n > 0 for n in ints) or moe.top_k > moe.num_experts:
        raise FormatError(f"{where}: num_experts {moe.num_experts!r}, top_k {moe.top_k!r} and intermediate_size "
                          f"{moe.intermediate_size!r} must be positive integers with top_k <= num_experts")
    return moe


def _strict_keys(d: Any, cls: type, where: str) -> dict[str, Any]:
    """Unknown keys are errors, not silently ignored: a newer writer must bump the schema."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unknown = sorted(set(d) - fields)
    if unknown:
        raise FormatError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(required - set(d))
    if missing:
        raise FormatError(f"{where}: missing key(s) {missing}")
    return d
