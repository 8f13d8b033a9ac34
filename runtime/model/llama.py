"""The Llama-family forward pass over one rank's fused weights.

Tensor parallelism appears only as ``comm.all_reduce`` after the row-parallel projections (and the
vocab-parallel embedding) and ``comm.gather_last_dim`` after the vocab-parallel lm_head. A pipeline
stage holds layers ``[start, stop)``: the first stage embeds the tokens, the others take the previous
stage's hidden states, and only the last stage has the final norm and lm_head. Numerics
follow Hugging Face's reference implementation: RMSNorm in float32, rotary tables in float32.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from formats import fp8
from formats.config import ModelConfig
from formats.fp8 import Fp8Format
from formats.int4 import Int4Format
from formats.sharding import heads_per_rank, kv_heads_per_rank
from runtime.kernels import Kernels
from runtime.kernels.cpu_dense import PackedDense
from runtime.kernels.cpu_fp8 import Fp8Weight
from runtime.kernels.moe import Int4Experts
from runtime.kernels.paged import PagedBatch
from runtime.kernels.reference import Int4Weight
from runtime.kv.batch import StepBatch
from runtime.kv.cache import PagedKVCache
from runtime.model.comm import Comm
from runtime.model.rope import apply_rope, cos_sin, inv_frequencies


@dataclass(frozen=True)
class ActOrder:
    """An act-order int4 linear (GPTQ ``desc_act``): its input rows were reordered at conversion so each
    quantization group is contiguous; row k multiplies input feature ``perm[k]``, gathered before the GEMM."""

    perm: torch.Tensor  # (K,) int64, rank-local
    weight: object  # what kernels.prepare_int4 made of the reordered Int4Weight


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP on one rank: the replicated router and this rank's experts (all of them, sliced, or
    whole experts [start, start + E_r) with ``--ep``), as ``kernels.fused_moe`` takes them."""

    router: torch.Tensor  # (num_experts, hidden)
    gate_up: torch.Tensor | Int4Experts  # (E_r, 2 I_r, hidden): per expert [gate; up]
    down: torch.Tensor | Int4Experts  # (E_r, hidden, I_r)
    start: int  # global id of this rank's first expert


@dataclass(frozen=True)
class Layer:
    attention_norm: torch.Tensor
    wqkv: torch.Tensor | Int4Weight | Fp8Weight
    bqkv: torch.Tensor | None
    wo: torch.Tensor | Int4Weight | Fp8Weight
    ffn_norm: torch.Tensor
    w_gate_up: torch.Tensor | Int4Weight | Fp8Weight | None  # None in a mixture-of-experts layer
    w_down: torch.Tensor | Int4Weight | Fp8Weight | None
    q_norm: torch.Tensor | None = None  # Qwen3, Gemma 3: (head_dim,), over each head of q and of k
    k_norm: torch.Tensor | None = None
    post_attention_norm: torch.Tensor | None = None  # Gemma 3's sandwich norms
    post_ffn_norm: torch.Tensor | None = None
    sliding: bool = False  # a sliding-window layer (Gemma 3: its own RoPE base)
    experts: Experts | None = None


class Model:
    def __init__(self, cfg: ModelConfig, tp: int, rank: int, weights: dict[str, torch.Tensor], comm: Comm,
                 kernels: Kernels, quant: Int4Format | Fp8Format | None = None,
                 layers: tuple[int, int] | None = None, built: Callable[[int], None] | None = None):
        """``rank`` is the tensor rank; ``quant`` the workspace's weight quantization; ``layers`` this stage's
        decoder layers (None: all of them); ``built(i)`` is called once decoder layer i holds what it needs."""
        self.cfg, self.comm, self.kernels, self.quant = cfg, comm, kernels, quant
        self.hq, self.hkv, self.d = heads_per_rank(cfg, tp), kv_heads_per_rank(cfg, tp), cfg.head_dim
        self.tp, self.rank = tp, rank
        start, stop = layers or (0, cfg.num_layers)
        self.first, self.last = "tok_embeddings.weight" in weights, "norm.weight" in weights
        self.embed = weights.get("tok_embeddings.weight")
        lm_head = weights.get("lm_head.weight", self.embed)  # a tied single stage: the embedding
        self.lm_head = None if lm_head is None else kernels.prepare_dense(lm_head)  # its own copy when packed
        self.vocab_start = rank * self.embed.shape[0] if self.first else 0  # vocab-parallel: this rank's first row
        self.norm = weights.get("norm.weight")
        self.layers = []
        for i in range(start, stop):
            self.layers.append(self._layer(weights, i))
            if built is not None:
                built(i)
        device = self.layers[0].ffn_norm.device
        self.inv_freq = inv_frequencies(cfg).to(device)
        # Gemma 3: sliding layers rotate with their own, unscaled base
        self.local_inv_freq = None if cfg.local_rope_theta is None else inv_frequencies(
            dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=None)).to(device)
        self.act = F.silu if cfg.hidden_act == "silu" else partial(F.gelu, approximate="tanh")
        self.embed_scale = cfg.hidden_size ** 0.5 if cfg.embed_scale else None

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> Layer:
        p = f"layers.{i}."

        def lin(name: str) -> torch.Tensor | Int4Weight | Fp8Weight | ActOrder:
            if self.quant is None:
                return self.kernels.prepare_dense(w[f"{p}{name}.weight"])
            if isinstance(self.quant, Fp8Format):
                return self.kernels.prepare_fp8(Fp8Weight(w[f"{p}{name}.weight"], w[f"{p}{name}.{fp8.SCALE}"],
                                                          self.quant.block_k))
            out = self.kernels.prepare_int4(Int4Weight(w[f"{p}{name}.qweight"], w[f"{p}{name}.scales"],
                                                       w[f"{p}{name}.zeros"], self.quant.group_size))
            perm = w.get(f"{p}{name}.perm")
            return out if perm is None else ActOrder(perm.long(), out)

        moe = self.cfg.is_moe(i)
        return Layer(w[p + "attention_norm.weight"], lin("attention.wqkv"), w.get(p + "attention.wqkv.bias"),
                     lin("attention.wo"), w[p + "ffn_norm.weight"], None if moe else lin("feed_forward.w_gate_up"),
                     None if moe else lin("feed_forward.w_down"), w.get(p + "attention.q_norm.weight"),
                     w.get(p + "attention.k_norm.weight"), w.get(p + "post_attention_norm.weight"),
                     w.get(p + "post_ffn_norm.weight"), self.cfg.is_sliding(i), self._experts(w, p) if moe else None)

    def _experts(self, w: dict[str, torch.Tensor], p: str) -> Experts:
        """The stored 2-D expert tensors (``formats.sharding``) viewed per expert, without a copy."""
        moe = self.cfg.moe
        e = moe.experts_per_rank(self.tp)
        p += "feed_forward."
        if self.quant is None:
            gate_up, down = w[p + "experts.w_gate_up.weight"], w[p + "experts.w_down.weight"]
            gate_up = gate_up.view(e, -1, gate_up.shape[1])
            down = down.view(down.shape[0], e, -1).permute(1, 0, 2)
        else:  # int4 (K, N) parts: gate_up's experts side by side on N, down's stacked on K
            def part(name: str, stacked: bool) -> torch.Tensor:
                t = w[f"{p}experts.{name}"]
                return t.view(e, -1, t.shape[1]) if stacked else t.view(t.shape[0], e, -1).permute(1, 0, 2)

            g = self.quant.group_size
            gate_up, down = (Int4Experts(part(f"{n}.qweight", s), part(f"{n}.scales", s), part(f"{n}.zeros", s), g)
                             for n, s in (("w_gate_up", False), ("w_down", True)))
        prepare = self.kernels.prepare_experts
        start = moe.expert_range(self.tp, self.rank).start
        return Experts(w[p + "router.weight"], prepare(gate_up), prepare(down), start)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, batch: StepBatch, cache: PagedKVCache,
                all_logits: bool = False, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits (tensor rank 0 of the last stage only) for each sequence's last new token, or for every
        token if ``all_logits``; a stage before the last returns its (T, hidden) output instead. Stages
        after the first take the previous stage's ``hidden`` in place of the tokens."""
        x = self._embed(tokens) if self.first else hidden  # (T, hidden)
        positions = batch.positions().to(x.device)
        rope = cos_sin(self.inv_freq, positions, x.dtype)
        local = rope if self.local_inv_freq is None else cos_sin(self.local_inv_freq, positions, x.dtype)
        pb = cache.prepare(batch)
        for i, layer in enumerate(self.layers):
            cos, sin = local if layer.sliding else rope
            a = self._attention(i, layer, self._norm(x, layer.attention_norm), cos, sin, pb, cache)
            x = x + (a if layer.post_attention_norm is None else self._norm(a, layer.post_attention_norm))
            m = self._mlp(layer, self._norm(x, layer.ffn_norm))
            x = x + (m if layer.post_ffn_norm is None else self._norm(m, layer.post_ffn_norm))
        if not self.last:
            return x
        if not all_logits:
            x = x[batch.last_token_index().to(x.device)]  # (B, hidden): only what sampling needs
        logits = self.comm.gather_last_dim(self._linear(self._norm(x, self.norm), self.lm_head))
        return None if logits is None else logits[:, :self.cfg.vocab_size]  # drop vocab padding

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.cfg.rms_norm_eps, self.cfg.norm_offset)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.comm.world == 1:
            x = F.embedding(tokens, self.embed)
        else:
            local = tokens - self.vocab_start
            outside = (local < 0) | (local >= self.embed.shape[0])
            x = F.embedding(local.masked_fill(outside, 0), self.embed)
            x[outside] = 0  # another rank owns these rows; the all-reduce brings them in
            x = self.comm.all_reduce(x)
        if self.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype, as the reference does
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        return x

    def _attention(self, i: int, layer: Layer, x: torch.Tensor, cos, sin, pb: PagedBatch,
                   cache: PagedKVCache) -> torch.Tensor:
        t = x.shape[0]
        qkv = self._linear(x, layer.wqkv, layer.bqkv)  # (T, (hq + 2 hkv) D)
        heads = self.hq + self.hkv
        qk = qkv[:, :heads * self.d].reshape(t, heads, self.d)  # q and k sit side by side in the fused output
        if layer.q_norm is None:  # one RoPE pass over both
            q, k = apply_rope(qk, cos, sin).split([self.hq, self.hkv], dim=1)  # views: kernels take strided q, k
        else:  # Qwen3, Gemma 3: per-head RMSNorm (own weights for q and k) before RoPE
            q, k = qk.split([self.hq, self.hkv], dim=1)
            q = apply_rope(self._norm(q, layer.q_norm), cos, sin)  # (T, hq, D)
            k = apply_rope(self._norm(k, layer.k_norm), cos, sin)  # (T, hkv, D)
        v = qkv[:, heads * self.d:].reshape(t, self.hkv, self.d)
        o = cache.attend(i, q, k, v, pb)  # (T, hq, D)
        return self.comm.all_reduce(self._linear(o.reshape(t, self.hq * self.d), layer.wo))

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        if layer.experts is not None:
            return self._moe(layer.experts, x)
        gate, up = self._linear(x, layer.w_gate_up).chunk(2, dim=-1)  # (T, I/tp) each
        return self.comm.all_reduce(self._linear(self.act(gate) * up, layer.w_down))

    def _moe(self, e: Experts, x: torch.Tensor) -> torch.Tensor:
        """Route each token to its top-k experts (softmax in float32, as the reference), then this rank's share of
        their weighted sum; the all-reduce adds the other ranks' slices (or experts)."""
        probs = torch.softmax(F.linear(x, e.router).float(), dim=-1)  # (T, num_experts)
        weights, ids = torch.topk(probs, self.cfg.moe.top_k, dim=-1)
        if self.cfg.moe.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.kernels.fused_moe(x, e.gate_up, e.down, ids, weights, e.start, self.cfg.hidden_act)
        return self.comm.all_reduce(out)

    def _linear(self, x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The one place the model multiplies by a weight: dense (N, K), or an int4 or FP8 linear in the form
        the kernels prepared at load (dequantized once, it is dense too)."""
        if isinstance(w, torch.Tensor):
            return F.linear(x, w, bias)
        if isinstance(w, PackedDense):
            return self.kernels.dense_linear(x, w, bias)
        if isinstance(w, Fp8Weight):
            return self.kernels.w8a16_linear(x, w, bias)
        if isinstance(w, ActOrder):
            x, w = x.index_select(-1, w.perm), w.weight  # (T, K) in the weight's row order
        return self.kernels.w4a16_linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as the Llama reference does; with
    ``offset`` (Gemma) the scale is (1 + weight), applied in float32 before the cast."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (x32 * (1.0 + weight.float())).to(x.dtype)
    return weight * x32.to(x.dtype)
