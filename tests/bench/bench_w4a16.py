"""The Triton W4A16 linear beside a dense fp16 ``torch.matmul``, same shapes, same GPU, same run.

Shapes are Llama-3-8B's linears at tp=1 (G=128): qkv 4096 -> 6144, o 4096 -> 4096, gate_up
4096 -> 28672, down 14336 -> 4096, for M = 1, 4, 16 (decode path) and 64, 256 (prefill path).
Each figure is the median of ``triton.testing.do_bench`` (L2 flushed before every call, so small
weights are read from HBM as in a real forward pass). GB/s counts the weight bytes each side must
read: packed int4 + scales + zeros for the kernel, K * N * 2 for fp16. Speedup = matmul ms / W4A16
ms. Not a test: nothing is asserted but that the two agree. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
MS = (1, 4, 16, 64, 256)
GROUP_SIZE = 128


def _weight(k: int, n: int, device: str):
    """Random int4 weights in the canonical layout: random int32 words are random nibbles."""
    import torch

    from runtime.kernels.reference import Int4Weight

    gen = torch.Generator(device).manual_seed(k + n)
    qweight = torch.randint(-2**31, 2**31, (k // 8, n), dtype=torch.int32, device=device, generator=gen)
    scales = (torch.rand(k // GROUP_SIZE, n, device=device, generator=gen) * 0.02).half()
    zeros = torch.randint(0, 16, (k // GROUP_SIZE, n), dtype=torch.uint8, device=device, generator=gen)
    return Int4Weight(qweight, scales, zeros, GROUP_SIZE)


def measure(name: str, k: int, n: int, m: int) -> dict:
    """One row: times, speedup, weight GB/s, the config the kernel picked and its error vs dense."""
    import torch
    from triton.testing import do_bench

    from formats import int4
    from runtime.kernels.w4a16 import pick_config, w4a16_linear

    w = _weight(k, n, "cuda")
    dense = int4.dequantize(w.qweight, w.scales, w.zeros, GROUP_SIZE)  # (K, N) fp16, the same weights
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref, out = x @ dense, w4a16_linear(x, w)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    ms_q = do_bench(lambda: w4a16_linear(x, w), return_mode="median")
    ms_d = do_bench(lambda: torch.matmul(x, dense), return_mode="median")
    q_bytes = sum(t.numel() * t.element_size() for t in (w.qweight, w.scales, w.zeros))
    cfg = pick_config(m, n, k, GROUP_SIZE, x.device)
    return {"linear": name, "K": k, "N": n, "M": m, "w4a16_ms": ms_q, "matmul_ms": ms_d, "speedup": ms_d / ms_q,
            "w4a16_GBps": q_bytes / ms_q / 1e6, "matmul_GBps": dense.numel() * 2 / ms_d / 1e6, "rel_err": err,
            "config": f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} split {cfg.split_k}"}


def _table(rows: list[dict], device: str) -> str:
    lines = [f"W4A16 (G={GROUP_SIZE}) vs fp16 torch.matmul on {device}", "",
             "| linear (K→N) | M | W4A16 ms | matmul ms | speedup | W4A16 GB/s | matmul GB/s | rel err | config |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['linear']} ({r['K']}→{r['N']}) | {r['M']} | {r['w4a16_ms']:.4f} | {r['matmul_ms']:.4f} | "
                     f"{r['speedup']:.2f}× | {r['w4a16_GBps']:.0f} | {r['matmul_GBps']:.0f} | {r['rel_err']:.1e} | "
                     f"{r['config']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows (and the device name) as JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_w4a16: needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset); skipping")
        sys.exit(0)
    device = torch.cuda.get_device_name()
    rows = [measure(name, k, n, m) for name, (k, n) in SHAPES.items() for m in MS]
    table = _table(rows, device)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "group_size": GROUP_SIZE, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
