"""The fused MoE kernel beside a per-expert loop of torch matmuls, same shapes, same device, same run.

Shapes: one rank's MoE layer of Qwen3-30B-A3B (H 2048, I 768, 128 experts, top-8), bf16 activations,
the experts dense bf16 and int4 (G 128, fp16 scales), stored as the workspace stores them (strided
views), for T = 1, 16, 256 tokens routed by random logits. The baseline is ``moe.moe_torch``: a loop over
the experts that received tokens, two F.linear (torch.matmul) each, what transformers' expert loop does;
for int4 it runs on the experts dequantized once (a matmul loop has no int4 path). Each figure is the
median of ``triton.testing.do_bench`` (L2 flushed before every call). GB/s counts the weight bytes of
the experts the batch touches (int4: packed + scales + zeros). Speedup = loop ms / fused ms. Not a
test: nothing is asserted but that the two agree. Without CUDA it runs tiny shapes, the kernel in
Triton's interpreter, timed by perf_counter, and the table says it measured CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

GPU_SHAPE = dict(h=2048, i=768, e=128, k=8)  # Qwen3-30B-A3B per rank at ep 1
CPU_SHAPE = dict(h=64, i=32, e=8, k=2)  # interpreter-sized
TOKENS = (1, 16, 256)
GROUP_SIZE = 128
CPU_GROUP_SIZE = 32


def _experts(h: int, i: int, e: int, quant: str, device: str, g: int):
    """(w_gate_up, w_down) as the workspace stores them; random int32 words are random nibbles."""
    import torch

    from runtime.kernels.moe import Int4Experts

    gen = torch.Generator(device).manual_seed(0)
    if quant == "dense":
        gate_up = (torch.randn(e * 2 * i, h, device=device, generator=gen) / h ** 0.5).bfloat16().view(e, 2 * i, h)
        down = (torch.randn(h, e * i, device=device, generator=gen) / i ** 0.5).bfloat16()
        return gate_up, down.view(h, e, i).permute(1, 0, 2)  # (E, H, I), strided

    def stored(k: int, n: int, view) -> Int4Experts:
        q = torch.randint(-2**31, 2**31, (k // 8, n), dtype=torch.int32, device=device, generator=gen)
        scales = (torch.rand(k // g, n, device=device, generator=gen) * 0.02).half()
        zeros = torch.randint(0, 16, (k // g, n), dtype=torch.uint8, device=device, generator=gen)
        return Int4Experts(view(q, k // 8), view(scales, k // g), view(zeros, k // g), g)

    return (stored(h, e * 2 * i, lambda t, rows: t.view(rows, e, 2 * i).permute(1, 0, 2)),
            stored(e * i, h, lambda t, rows: t.view(e, rows // e, h)))


def _weight_bytes(w, n_hit: int, n_experts: int) -> int:
    from runtime.kernels.moe import Int4Experts

    parts = (w.qweight, w.scales, w.zeros) if isinstance(w, Int4Experts) else (w,)
    return sum(p.numel() * p.element_size() for p in parts) * n_hit // n_experts


def _time(fn, cuda: bool) -> float:
    """Median milliseconds of fn."""
    if cuda:
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()  # warm the interpreter's caches
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(quant: str, t: int, shape: dict, device: str, g: int) -> dict:
    """One row: both times, speedup, weight GB/s of the fused kernel, its config and its error vs the loop."""
    import torch

    from runtime.kernels.fused_moe import fused_moe, pick_config
    from runtime.kernels.moe import dequantize_experts, moe_torch

    h, i, e, k = shape["h"], shape["i"], shape["e"], shape["k"]
    gate_up, down = _experts(h, i, e, quant, device, g)
    dense = [w if quant == "dense" else dequantize_experts(w, torch.bfloat16) for w in (gate_up, down)]
    gen = torch.Generator(device).manual_seed(t)
    weights, ids = torch.randn(t, e, device=device, generator=gen).softmax(-1).topk(k, dim=-1)
    weights /= weights.sum(-1, keepdim=True)
    x = torch.randn(t, h, device=device, generator=gen).bfloat16()
    out, ref = fused_moe(x, gate_up, down, ids, weights), moe_torch(x, *dense, ids, weights)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    cuda = device == "cuda"
    ms_f = _time(lambda: fused_moe(x, gate_up, down, ids, weights), cuda)
    ms_l = _time(lambda: moe_torch(x, *dense, ids, weights), cuda)
    hit = ids.unique().numel()
    cfg = pick_config(t * k, e)
    return {"weights": quant, "T": t, "experts_hit": hit, "fused_ms": ms_f, "loop_ms": ms_l, "speedup": ms_l / ms_f,
            "fused_GBps": sum(_weight_bytes(w, hit, e) for w in (gate_up, down)) / ms_f / 1e6, "rel_err": err,
            "config": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}"}


def _table(rows: list[dict], where: str, shape: dict, g: int) -> str:
    lines = [f"Fused MoE vs a per-expert torch.matmul loop (moe_torch), bf16, H {shape['h']}, I {shape['i']}, "
             f"{shape['e']} experts, top-{shape['k']}, int4 G={g}; measured on {where}", "",
             "| weights | T | experts hit | fused ms | loop ms | speedup | fused GB/s | rel err | config (BMxBNxBK) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['weights']} | {r['T']} | {r['experts_hit']} | {r['fused_ms']:.4f} | {r['loop_ms']:.4f} | "
                     f"{r['speedup']:.2f}× | {r['fused_GBps']:.0f} | {r['rel_err']:.1e} | {r['config']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows (and the device name) as JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module first imports triton
    device = "cuda" if cuda else "cpu"
    where = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, tiny shapes: not a GPU figure)"
    shape, g = (GPU_SHAPE, GROUP_SIZE) if cuda else (CPU_SHAPE, CPU_GROUP_SIZE)
    rows = [measure(quant, t, shape, device, g) for quant in ("dense", "int4") for t in TOKENS]
    table = _table(rows, where, shape, g)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "shape": shape, "group_size": g, "rows": rows}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
