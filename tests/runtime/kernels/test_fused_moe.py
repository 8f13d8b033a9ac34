"""The Triton fused MoE against ``moe.moe_reference``; the CPU path ``moe.moe_torch`` and the int4 experts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from formats import int4
from formats.errors import TpDeployError
from runtime.kernels import moe, select
from runtime.kernels.fused_moe import Config, align, fused_moe
from runtime.kernels.moe import Int4Experts, dequantize_experts, moe_reference, moe_torch, prepare_experts_cpu

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# Max |kernel - reference| over max |reference|. Dense weights are the same values and int4 ones
# dequantize to the same bits, and the kernel rounds where the reference does (gate, up, act, act * up,
# down, * weight), so what is left is the order of the fp32 sums inside each GEMM and over the top-k:
# an intermediate rounded the other way moves an output by about an ulp of x's dtype; two cover it.
TOL = {
    F32: 1e-5,  # fp32 throughout: summation order only, K <= 160 terms
    F16: 2 * 2.0 ** -10,  # 2 fp16 ulps (10 mantissa bits)
    BF16: 2 * 2.0 ** -7,  # 2 bf16 ulps (7 mantissa bits)
}
DENSE = (48, 40)  # (H, I): neither a power of two nor a multiple of a 16-wide tile
INT4 = (160, 96)  # (H, I): 5 and 3 groups of G = 32, K/8 = 20 and 12 packed rows
GROUP = 32


def make_experts(e: int, h: int, i: int, dtype: torch.dtype, quant: str = "dense", layout: str = "workspace",
                 seed: int = 0):
    """(w_gate_up, w_down) for e experts, stored as the workspace stores them and viewed per expert:
    dense gate_up (E*2I, H) -> (E, 2I, H), down (H, E*I) -> (E, H, I) permuted (strided); int4 gate_up
    (H/8, E*2I) -> (E, H/8, 2I) permuted, down (E*I/8, H) -> (E, I/8, H). ``stacked``: contiguous copies."""
    gen = torch.Generator().manual_seed(seed)
    if quant == "dense":
        gate_up = (torch.randn(e * 2 * i, h, generator=gen) / h ** 0.5).to(dtype).view(e, 2 * i, h)
        down = (torch.randn(h, e * i, generator=gen) / i ** 0.5).to(dtype).view(h, e, i).permute(1, 0, 2)
    else:
        gate_up = _int4_stored(h, e * 2 * i, gen, lambda t, rows: t.view(rows, e, 2 * i).permute(1, 0, 2))
        down = _int4_stored(e * i, h, gen, lambda t, rows: t.view(e, rows // e, h))
    if layout == "stacked":
        gate_up, down = (_contiguous(w) for w in (gate_up, down))
    return gate_up, down


def _int4_stored(k: int, n: int, gen, per_expert) -> Int4Experts:
    """A stored (K, N) int4 tensor (random nibbles, zeros, fp16 scales of either sign), viewed per expert."""
    q = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // GROUP, n), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(k // GROUP, n, generator=gen) * 0.04 - 0.02).to(F16)
    return Int4Experts(per_expert(int4.pack(q), k // 8), per_expert(scales, k // GROUP), per_expert(zeros, k // GROUP),
                       GROUP)


def _contiguous(w):
    if isinstance(w, Int4Experts):
        return Int4Experts(w.qweight.contiguous(), w.scales.contiguous(), w.zeros.contiguous(), w.group_size)
    return w.contiguous()


def _to(w, device):
    if isinstance(w, Int4Experts):
        return Int4Experts(w.qweight.to(device), w.scales.to(device), w.zeros.to(device), w.group_size)
    return w.to(device)


def route(t: int, n_experts: int, k: int, seed: int = 1, experts: list[int] | None = None):
    """(topk_ids (T, k) int64, topk_weights (T, k) fp32): the top k of random logits, renormalised;
    ``experts``: only these may be chosen (the others receive no token)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, n_experts, generator=gen)
    if experts is not None:
        logits[:, [e for e in range(n_experts) if e not in experts]] = -torch.inf
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    return ids, weights / weights.sum(-1, keepdim=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()


def run_case(t, e, k, dtype, quant, device, layout="workspace", activation="silu", experts=None, config=None):
    h, i = DENSE if quant == "dense" else INT4
    gate_up, down = (_to(w, device) for w in make_experts(e, h, i, dtype, quant, layout))
    ids, weights = (v.to(device) for v in route(t, e, k, experts=experts))
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    out = fused_moe(x, gate_up, down, ids, weights, activation=activation, config=config)
    return out, moe_reference(x, gate_up, down, ids, weights, activation=activation)


# (T, E_r, top-k, dtype, weights, layout): every token count once or more, E 8 and 60 (with T*k < 60 some
# experts get no token), both w_down layouts, int4 with fp16 scales under each activation dtype.
CASES = [
    (1, 8, 2, F32, "dense", "workspace"),
    (3, 60, 8, BF16, "dense", "workspace"),
    (17, 8, 1, F16, "dense", "stacked"),
    (65, 60, 2, F32, "dense", "workspace"),
    (65, 8, 8, F16, "dense", "workspace"),
    (1025, 8, 2, BF16, "dense", "workspace"),
    (1, 60, 8, F16, "int4", "workspace"),
    (3, 8, 1, F32, "int4", "stacked"),
    (17, 60, 8, BF16, "int4", "workspace"),
    (1025, 8, 2, F16, "int4", "workspace"),
]


def _id(case) -> str:
    t, e, k, dtype, quant, layout = case
    return f"T{t}-E{e}-k{k}-{str(dtype).removeprefix('torch.')}-{quant}-{layout}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(case, device):
    t, e, k, dtype, quant, layout = case
    out, ref = run_case(t, e, k, dtype, quant, device, layout)
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("quant,dtype", [("dense", F32), ("int4", BF16)], ids=["dense-float32", "int4-bfloat16"])
def test_gelu_tanh(quant, dtype, device):
    out, ref = run_case(17, 8, 2, dtype, quant, device, activation="gelu_tanh")
    assert rel_err(out, ref) <= TOL[dtype]


@pytest.mark.parametrize("quant", ["dense", "int4"])
def test_experts_without_tokens(quant, device):
    """65 tokens all routed to experts 1 and 6 of 8: six experts get nothing, two get long runs."""
    out, ref = run_case(65, 8, 2, F16, quant, device, experts=[1, 6])
    assert rel_err(out, ref) <= TOL[F16]


@pytest.mark.parametrize("quant", ["dense", "int4"])
def test_expert_parallel_ranks_sum_to_the_whole(quant, device):
    """32 experts over 4 ranks of 8: each rank's share matches the reference's, and the shares add up."""
    h, i = DENSE if quant == "dense" else INT4
    t, k, e_r = 17, 8, 8
    gate_up, down = (_to(w, device) for w in make_experts(4 * e_r, h, i, F32, quant, "stacked"))
    ids, weights = (v.to(device) for v in route(t, 4 * e_r, k))
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(device)
    total = torch.zeros(t, h, device=device)
    for start in range(0, 4 * e_r, e_r):
        local_gu, local_down = (_slice(w, start, e_r) for w in (gate_up, down))
        share = fused_moe(x, local_gu, local_down, ids, weights, expert_start=start)
        assert rel_err(share, moe_reference(x, local_gu, local_down, ids, weights, expert_start=start)) <= TOL[F32]
        total += share
    assert rel_err(total, moe_reference(x, gate_up, down, ids, weights)) <= TOL[F32]


def _slice(w, start, n):
    if isinstance(w, Int4Experts):
        return Int4Experts(*(p[start:start + n] for p in (w.qweight, w.scales, w.zeros)), w.group_size)
    return w[start:start + n]


def test_no_local_expert_gives_zeros(device):
    h, i = DENSE
    gate_up, down = (_to(w, device) for w in make_experts(8, h, i, F16))
    ids, weights = (v.to(device) for v in route(5, 16, 2))
    x = torch.randn(5, h, device=device, dtype=F16)
    assert torch.equal(fused_moe(x, gate_up, down, ids, weights, expert_start=100), torch.zeros_like(x))


# Narrow tiles: several N tiles with a partial last one, a masked last K tile (dense K 40 and 48), grouped
# order with a short last group, and BLOCK_K 16 < G for int4.
@pytest.mark.parametrize("quant", ["dense", "int4"])
def test_explicit_config(quant, device):
    cfg = Config(block_m=16, block_n=32, block_k=32 if quant == "dense" else 16, group_m=3)
    out, ref = run_case(65, 8, 2, F32, quant, device, config=cfg)
    assert rel_err(out, ref) <= TOL[F32]


@pytest.mark.parametrize("t,e,k,bm", [(1, 8, 2, 16), (65, 8, 8, 16), (17, 60, 2, 32)])
def test_align_puts_each_block_in_one_expert(t, e, k, bm):
    ids = route(t, e + 4, k)[0]  # experts e .. e + 3 are another rank's
    sorted_ids, block_expert = align(ids, 0, e, bm)
    flat = ids.flatten()
    seen = []
    for b, expert in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * bm:(b + 1) * bm]
        real = rows[rows < t * k].long()
        if expert < 0:
            assert real.numel() == 0
            continue
        assert (flat[real] == expert).all() and real.numel() > 0
        seen += real.tolist()
    assert sorted(seen) == [j for j in range(t * k) if flat[j] < e]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("quant", ["dense", "int4"])
def test_moe_torch_equals_reference(quant, dtype):
    """Same rows, same F.linear per expert, the same fp32 additions in the same order: the same bits."""
    h, i = DENSE if quant == "dense" else INT4
    gate_up, down = make_experts(16, h, i, dtype, quant)
    ids, weights = route(65, 24, 4)  # ids 16 .. 23 are another rank's
    x = torch.randn(65, h).to(dtype)
    for start in (0, 8):
        ref = moe_reference(x, gate_up, down, ids, weights, expert_start=start)
        assert torch.equal(moe_torch(x, gate_up, down, ids, weights, expert_start=start), ref)
    prepare = prepare_experts_cpu(dtype)
    assert torch.equal(moe_torch(x, prepare(gate_up), prepare(down), ids, weights), moe_reference(x, gate_up, down,
                                                                                                  ids, weights))


@pytest.mark.parametrize("layout", ["workspace", "stacked"])
def test_dequantize_experts_is_formats_dequantize(layout):
    h, i = INT4
    gate_up, down = make_experts(5, h, i, F16, "int4", layout)
    for w, (k, n) in ((gate_up, (h, 2 * i)), (down, (i, h))):
        dense = dequantize_experts(w, BF16)
        assert dense.shape == (5, n, k) and dense.is_contiguous() and dense.dtype == BF16
        for e in range(5):
            want = int4.dequantize(w.qweight[e].contiguous(), w.scales[e].contiguous(), w.zeros[e].contiguous(), GROUP)
            assert torch.equal(dense[e], want.to(BF16).t())


def test_prepare_experts_cpu_keeps_dense_and_dequantizes_int4():
    gate_up = make_experts(2, *DENSE, F32)[0]
    assert prepare_experts_cpu(F32)(gate_up) is gate_up
    w = make_experts(2, *INT4, F16, "int4")[1]
    assert torch.equal(prepare_experts_cpu(F32)(w), dequantize_experts(w, F32))


@pytest.mark.parametrize("choice,fn", [("torch", moe_torch), ("reference", moe_reference), ("triton", fused_moe)])
def test_select_wires_fused_moe(choice, fn, monkeypatch):
    monkeypatch.setenv("TPDEPLOY_KERNELS", choice)
    assert select(torch.device("cpu")).fused_moe is fn


@pytest.mark.parametrize("bad,match", [
    (dict(activation="relu"), "activation='relu'"),
    (dict(down_i=32), "w_down is"),
    (dict(ids_t=4), "topk_ids is"),
    (dict(group=8), "group_size=8 must be a multiple of 16"),
    (dict(transposed_scales=True), "strides"),
], ids=["activation", "down", "ids", "group", "strides"])
def test_rejects_mismatches(bad, match, device):
    h, i = INT4
    gate_up, down = (_to(w, device) for w in make_experts(4, h, i, F16, "int4", "stacked"))
    if "group" in bad:
        gate_up = Int4Experts(gate_up.qweight, *(p.repeat_interleave(4, 1) for p in (gate_up.scales, gate_up.zeros)), 8)
    if "transposed_scales" in bad:
        gate_up = Int4Experts(gate_up.qweight, gate_up.scales.mT.contiguous().mT, gate_up.zeros, GROUP)
    if "down_i" in bad:
        down = _slice(make_experts(4, h, bad["down_i"], F16, "dense")[1], 0, 4).to(device)
    ids, weights = (v.to(device) for v in route(bad.get("ids_t", 3), 4, 2))
    x = torch.randn(3, h, device=device, dtype=F16)
    with pytest.raises(TpDeployError, match=match):
        fused_moe(x, gate_up, down, ids, weights, activation=bad.get("activation", "silu"))


def test_moe_module_needs_no_triton():
    """The CPU path must import where Triton is absent: moe.py imports nothing that imports triton."""
    tree = ast.parse(Path(moe.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith("triton") or m.startswith("runtime.kernels.")}, imported
