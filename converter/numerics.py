"""``tpconv verify --numerics``: every rank computes, after the tensor-parallel reduction, what the source does.

Hashes prove that the files are the ones the converter wrote, not that it wrote the right thing: a shard
cut at the wrong rows, or holding another rank's slice, hashes fine. This check runs, on CPU in float32,
the tensor-parallel part of the first and the last decoder layer of every stage — q/k/v, causal GQA
attention over a few random tokens, the output projection, gate/up, the activation, down — plus the
embedding lookup and the lm_head, once from each rank's shard as ``tprun`` splits the work, and once from
the source checkpoint; it compares each rank's contribution and the all-reduced sum.

The expectation is written here from the runtime's rules (rank t holds query heads [t·H/tp, (t+1)·H/tp),
its KV heads, intermediate rows and vocabulary rows in the same order; ``docs/workspace.md``), not from
``formats.shard_plan``, so a wrong split in the plan itself is caught too. Norms, RoPE and q/k norms act
on every rank alike; the norm weights are compared directly. Source weights are first cast to the
workspace dtype (int4: dequantized from the source's own codes; FP8: the source's weights times its own
tensor, row or block scales, by the source format's rule, not through the canonical scale layout), so a
right workspace differs from its source by the order of float32 sums only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from converter.source import Source, open_source, read_whole
from formats import fp8, int4
from formats.config import ModelConfig
from formats.head_padding import head_source
from formats.manifest import Manifest, RankEntry, load_manifest
from formats.shard_plan import int4_source_shape, source_names
from formats.sharding import kv_heads_per_rank, source_shape

RTOL = 1e-4  # relative L2 error allowed per output; a right workspace shows ~1e-7 (float32 summation order)
TOKENS = 7  # random tokens per check: enough for causal attention to mix positions
SAMPLED_VOCAB_ROWS = 5  # embedding rows looked up per rank, its first and last among them


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    checks: int = 0
    worst: float = 0.0
    seconds: float = 0.0

    def compare(self, what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        self.checks += 1
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        self.worst = max(self.worst, err)
        if not err <= RTOL:
            self.problems.append(f"{what}: relative error {err:.3g} against the source (tolerance {RTOL:g})")


def verify_numerics(workspace: Path, src_dir: Path | None = None) -> Report:
    """Every rank's outputs against the source checkpoint (the manifest's source path by default)."""
    t0 = time.perf_counter()
    manifest = load_manifest(workspace)
    src = open_source(Path(src_dir or manifest.source.path), "auto", manifest.weights.dtype)
    report = Report()
    try:
        if manifest.model.source_heads is not None:
            src.pad_heads(manifest.tp)  # the padded model is what the workspace must compute
        if manifest.model.moe is not None and manifest.model.moe.expert_parallel:
            src.expert_parallel()
        if src.config != manifest.model:
            report.problems.append(f"the source at {src.path} is not the model this workspace was converted from "
                                   "(its config differs); pass the right SRC")
            return report
        ref = _SourceWeights(src)
        with torch.no_grad():
            for stage in manifest.stages:
                ranks = [_RankWeights(Path(workspace), manifest.ranks[r]) for r in manifest.stage_ranks(stage.stage)]
                if stage.stage == 0:
                    _check_embedding(manifest, ref, ranks, report)
                for layer in sorted({stage.layers[0], stage.layers[1] - 1}):
                    _check_layer(manifest.model, layer, ref, ranks, report)
                    src.release()
                if stage.stage == manifest.pp - 1:
                    _check_head(manifest, ref, ranks, report)
    finally:
        src.checkpoint.close()
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


class _SourceWeights:
    """Full canonical tensors of the source, in the workspace dtype, as float32."""

    def __init__(self, src: Source):
        self.src, self.cfg = src, src.stored_config  # reads address the checkpoint's heads
        self._int4 = {n.rsplit(".", 1)[0] for n in source_names(src.config, src.int4 is not None) if int4.is_part(n)}
        self._fp8 = {fp8.weight_name(n) for n in source_names(src.config, fp8_linears=src.fp8 is not None)
                     if fp8.is_scale(n)}

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._fp8:
            ckpt = self.src.checkpoint
            weight, scale = (read_whole(ckpt, self.src.hf_name(n)) for n in (name, fp8.scale_name(name)))
            return self.src.fp8.dequantize_source(weight, scale)
        base = name.removesuffix(".weight")
        if base in self._int4:
            g = self.src.int4.group_size
            parts = [self.src.read(f"{base}.{p}", 0, 0, int4_source_shape(f"{base}.{p}", self.cfg, g)[0])
                     for p in int4.PARTS]
            w = int4.dequantize(*parts, g).float().t()
            if self.src.int4.act_order and base.rsplit(".", 1)[1] in _GATHERED_SOURCES:
                w = _input_order(w, self.src.read(f"{base}.{int4.PERM}", 0, 0, w.shape[1]))
            return w
        return self.rows(name, 0, source_shape(name, self.cfg)[0])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.src.read(name, 0, start, stop).to(self.src.out_dtype(name)).float()


# Act-order: these linears' rows were reordered and a gather restores the input order (w_down's order is
# folded into w_gate/w_up on both sides alike, so it is compared as stored).
_GATHERED_SOURCES = ("wq", "wk", "wv", "wo", "w_gate", "w_up")


def _input_order(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(N, K) weight whose column k multiplies input perm[k] -> the same weight in input order."""
    out = torch.empty_like(w)
    out[:, perm.long()] = w
    return out


class _RankWeights:
    """One rank's tensors by canonical name, int4 linears dequantized, as float32."""

    def __init__(self, ws: Path, rank: RankEntry):
        self.rank = rank.rank
        self._ws, self._entries = ws, {t.name: t for t in rank.tensors}

    def has(self, name: str) -> bool:
        return name in self._entries or name.replace(".weight", ".qweight") in self._entries

    def __call__(self, name: str) -> torch.Tensor:
        scale = fp8.scale_name(name)
        if scale in self._entries:
            return fp8.dequantize(self._read(name), self._read(scale), self._entries[scale].quant.block_k)
        qweight = name.removesuffix(".weight") + ".qweight"
        if qweight in self._entries:
            base = name.removesuffix(".weight")
            parts = [self._read(f"{base}.{p}") for p in int4.PARTS]
            w = int4.dequantize(*parts, self._entries[qweight].quant.group_size).float().t()
            perm = f"{base}.{int4.PERM}"
            return _input_order(w, self._read(perm)) if perm in self._entries else w
        return self._read(name).float()

    def _read(self, name: str) -> torch.Tensor:
        with safe_open(self._ws / self._entries[name].file, "pt") as f:
            return f.get_tensor(name)


def _heads(cfg: ModelConfig, tp: int, t: int) -> tuple[range, range]:
    """Query heads and KV heads of tensor rank ``t`` (KV heads replicated to adjacent ranks when tp > KV)."""
    q = cfg.num_heads // tp
    kv = kv_heads_per_rank(cfg, tp)
    first_kv = t * kv if cfg.num_kv_heads >= tp else t // (tp // cfg.num_kv_heads)
    return range(t * q, (t + 1) * q), range(first_kv, first_kv + kv)


def _check_layer(cfg: ModelConfig, i: int, ref: _SourceWeights, ranks: list[_RankWeights], report: Report) -> None:
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(TOKENS, cfg.hidden_size, generator=gen)
    p, d, tp = f"layers.{i}.", cfg.head_dim, len(ranks)
    q, k, v = (_pad(cfg, kind, _linear(x, ref, p + f"attention.{w}", cfg.qkv_bias).view(TOKENS, -1, d))
               for w, kind in (("wq", "q"), ("wk", "kv"), ("wv", "kv")))
    o = _attend(q, k, v)
    wo = _pad(cfg, "q", ref(p + "attention.wo.weight").view(cfg.hidden_size, -1, d)).flatten(1)
    moe = cfg.is_moe(i)
    if not moe:
        gate, up = (_linear(x, ref, p + f"feed_forward.{w}") for w in ("w_gate", "w_up"))
        act = _act(cfg.hidden_act, gate) * up
        down = ref(p + "feed_forward.w_down.weight")
        per = cfg.intermediate_size // tp
    attn_sum, mlp_sum = torch.zeros(TOKENS, cfg.hidden_size), torch.zeros(TOKENS, cfg.hidden_size)
    for t, rank in enumerate(ranks):
        qh, kvh = _heads(cfg, tp, t)
        name = f"rank{rank.rank} {p}"
        qkv = x @ rank(p + "attention.wqkv.weight").t()
        if cfg.qkv_bias:
            qkv = qkv + rank(p + "attention.wqkv.bias")
        rq, rk, rv = qkv.split([len(qh) * d, len(kvh) * d, len(kvh) * d], dim=1)
        for part, got, want in (("q", rq, q[:, qh]), ("k", rk, k[:, kvh]), ("v", rv, v[:, kvh])):
            report.compare(f"{name}attention.wqkv.weight ({part} rows)", got, want.reshape(TOKENS, -1))
        ro = _attend(rq.view(TOKENS, -1, d), rk.view(TOKENS, -1, d), rv.view(TOKENS, -1, d))
        partial = ro.reshape(TOKENS, -1) @ rank(p + "attention.wo.weight").t()
        cols = slice(qh.start * d, qh.stop * d)
        report.compare(f"{name}attention.wo.weight", partial, o.reshape(TOKENS, -1)[:, cols] @ wo[:, cols].t())
        attn_sum += partial
        _check_replicated(rank, p, ref, report)
        if moe:
            continue
        rgate, rup = (x @ rank(p + "feed_forward.w_gate_up.weight").t()).split(per, dim=1)
        rows = slice(t * per, (t + 1) * per)
        report.compare(f"{name}feed_forward.w_gate_up.weight (gate rows)", rgate, gate[:, rows])
        report.compare(f"{name}feed_forward.w_gate_up.weight (up rows)", rup, up[:, rows])
        partial = (_act(cfg.hidden_act, rgate) * rup) @ rank(p + "feed_forward.w_down.weight").t()
        report.compare(f"{name}feed_forward.w_down.weight", partial, act[:, rows] @ down[:, rows].t())
        mlp_sum += partial
    report.compare(f"{p}attention after the all-reduce over {tp} ranks", attn_sum, o.reshape(TOKENS, -1) @ wo.t())
    if moe:
        _check_experts(cfg, i, x, ref, ranks, report)
    else:
        report.compare(f"{p}MLP after the all-reduce over {tp} ranks", mlp_sum, act @ down.t())


def _check_experts(cfg: ModelConfig, i: int, x: torch.Tensor, ref: _SourceWeights, ranks: list[_RankWeights],
                   report: Report) -> None:
    """A mixture-of-experts layer: the router on every rank, then each rank's share of the routed sum (a slice
    of every expert, or its whole experts with --ep) and the all-reduced sum, against the source's experts."""
    p, moe, tp = f"layers.{i}.", cfg.moe, len(ranks)
    router = ref(p + "feed_forward.router.weight")
    probs = (x @ router.t()).softmax(-1)
    weights, ids = probs.topk(moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    per = moe.intermediate_size if moe.expert_parallel else moe.intermediate_size // tp

    def ffn(w: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """An expert's output for every token (routed or not, so every expert is checked), from ``rows`` of it."""
        h = _act(cfg.hidden_act, x @ w["w_gate"][rows].t()) * (x @ w["w_up"][rows].t())
        return h @ w["w_down"][:, rows].t()

    def source(e: int) -> dict[str, torch.Tensor]:
        return {w: ref(f"{p}feed_forward.experts.{e}.{w}.weight") for w in ("w_gate", "w_up", "w_down")}

    def routing(e: int) -> torch.Tensor:
        return (weights * (ids == e)).sum(-1, keepdim=True)  # (tokens, 1): the weight of e for each token, or 0

    total = torch.zeros(TOKENS, cfg.hidden_size)
    for t, rank in enumerate(ranks):
        report.compare(f"rank{rank.rank} {p}feed_forward.router.weight", rank(p + "feed_forward.router.weight"),
                       router)
        experts = moe.expert_range(tp, t)
        gate_up = rank(p + "feed_forward.experts.w_gate_up.weight").view(len(experts), 2, per, -1)
        down = rank(p + "feed_forward.experts.w_down.weight").view(cfg.hidden_size, len(experts), per)
        rows = slice(0, per) if moe.expert_parallel else slice(t * per, (t + 1) * per)
        for j, e in enumerate(experts):
            got = ffn({"w_gate": gate_up[j, 0], "w_up": gate_up[j, 1], "w_down": down[:, j]}, slice(None))
            report.compare(f"rank{rank.rank} {p}expert {e}", got, ffn(source(e), rows))
            total += got * routing(e)
    full = sum(ffn(source(e), slice(None)) * routing(e) for e in range(moe.num_experts))
    report.compare(f"{p}experts after the all-reduce over {tp} ranks", total, full)


def _pad(cfg: ModelConfig, kind: str, x: torch.Tensor) -> torch.Tensor:
    """Heads (dim 1) of the checkpoint placed where ``--pad-heads`` put them, zero heads between."""
    if cfg.source_heads is None:
        return x
    count = cfg.num_heads if kind == "q" else cfg.num_kv_heads
    out = x.new_zeros(x.shape[0], count, *x.shape[2:])
    for p in range(count):
        h = head_source(cfg, kind, p)
        if h is not None:
            out[:, p] = x[:, h]
    return out


def _check_replicated(rank: _RankWeights, prefix: str, ref: _SourceWeights, report: Report) -> None:
    for norm in ("attention_norm", "ffn_norm", "post_attention_norm", "post_ffn_norm",
                 "attention.q_norm", "attention.k_norm"):
        name = f"{prefix}{norm}.weight"
        if rank.has(name):
            report.compare(f"rank{rank.rank} {name}", rank(name), ref(name))


def _linear(x: torch.Tensor, ref: _SourceWeights, base: str, bias: bool = False) -> torch.Tensor:
    y = x @ ref(f"{base}.weight").t()
    return y + ref(f"{base}.bias") if bias else y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of (tokens, heads, d) queries over (tokens, kv heads, d), query head h on KV head
    h // (heads / kv heads); no RoPE (the same rotation on every rank, so it cannot reveal a split)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(len(q), len(q), dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh") if name == "gelu_tanh" else torch.nn.functional.silu(x)


def _vocab_rows(m: Manifest, t: int) -> tuple[int, int]:
    """Rank ``t``'s vocabulary rows [start, stop) (the padding rows past the vocabulary hold zeros)."""
    per = m.padded_vocab_size // m.tp
    return min(t * per, m.model.vocab_size), min((t + 1) * per, m.model.vocab_size)


def _check_embedding(m: Manifest, ref: _SourceWeights, ranks: list[_RankWeights], report: Report) -> None:
    gen = torch.Generator().manual_seed(7)
    for t, rank in enumerate(ranks):
        start, stop = _vocab_rows(m, t)
        if start == stop:
            continue
        ids = sorted({start, stop - 1, *torch.randint(start, stop, (SAMPLED_VOCAB_ROWS - 2,), generator=gen).tolist()})
        table = rank("tok_embeddings.weight")
        got = table[[i - start for i in ids]]  # the rank's lookup; other ranks contribute zero to these ids
        want = torch.stack([ref.rows("tok_embeddings.weight", i, i + 1)[0] for i in ids])
        report.compare(f"rank{rank.rank} tok_embeddings.weight (rows {ids})", got, want)
        padding = table[stop - start:]
        if padding.numel() and padding.abs().max() != 0:
            report.problems.append(f"rank{rank.rank} tok_embeddings.weight: its padding rows past the vocabulary are "
                                   "not zero")


def _check_head(m: Manifest, ref: _SourceWeights, ranks: list[_RankWeights], report: Report) -> None:
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(TOKENS, m.model.hidden_size, generator=gen)
    tied_here = m.model.tie_word_embeddings and m.pp == 1  # the embedding shard serves as the head
    head, source = ("tok_embeddings.weight" if tied_here else "lm_head.weight",
                    "tok_embeddings.weight" if m.model.tie_word_embeddings else "lm_head.weight")
    for t, rank in enumerate(ranks):
        start, stop = _vocab_rows(m, t)
        logits = h @ rank(head).t()
        want = torch.zeros_like(logits)
        want[:, :stop - start] = h @ ref.rows(source, start, stop).t()
        report.compare(f"rank{rank.rank} {head} as lm_head (vocab rows {start}..{stop})", logits, want)
        report.compare(f"rank{rank.rank} norm.weight", rank("norm.weight"), ref("norm.weight"))
