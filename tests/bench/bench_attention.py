"""Paged decode attention (Triton) beside torch's scaled_dot_product_attention, same tokens, same GPU, same run.

Heads are Llama-3-8B's at tp=1 (Hq=32, Hkv=8, D=128), cache blocks of 64 tokens with shuffled block
tables, every sequence at the full context: 1k/4k/16k tokens, batch 1/4/16/64, KV in fp16, int8 and
int4 (random codes, small positive scales; the write kernel is not run). int4 keys have the runtime's
layout: one scale/zero per channel of each block and an fp16 tail slot per sequence; the contexts end on
a block edge, so every tail is empty (a partial block would add at most one fp16 block per sequence).
Each figure is the median of ``triton.testing.do_bench`` (L2 flushed before every call). GB/s counts
the bytes a call must read: K and V of every block and KV head (codes + fp16 scale/zero for int8/int4:
per token, int4 keys per channel) plus q and out. % copy is
that rate over the device's copy bandwidth, measured here as a 1 GiB device-to-device ``copy_``
(read + write = 2 GiB moved). Target: >= 80 % of copy bandwidth from 4k context on.

The baseline is SDPA over the same tokens laid out contiguously as fp16 (B, Hkv, L, D); for int8/int4
that is the dequantized fp16 cache, so it reads 2-4x the bytes. Its query is (B, Hkv, Hq/Hkv, D): the
heads of a GQA group are its query rows, so K/V are read once per group, as the kernel does.
Speedup = SDPA ms / kernel ms; rel err = max |kernel - SDPA| / max |SDPA|. Nothing is asserted. GPU only;
``--dry-run`` prints the cases and byte counts without one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HQ, HKV, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 64
CONTEXTS = (1024, 4096, 16384)
BATCHES = (1, 4, 16, 64)
KV_DTYPES = ("fp16", "int8", "int4")
COPY_BYTES = 1 << 30  # the copy-bandwidth tensor: large enough that launch overhead is noise
DEVICE = "cuda"  # one constant, so the case builders can be checked on the CPU too
MEM_FRACTION = 0.6  # skip a case whose cache + fp16 baseline exceed this share of free GPU memory


def kernel_bytes(kv_dtype: str, batch: int, context: int) -> int:
    """Bytes one decode_attention call reads and writes: K+V (params included) of every block, q and out."""
    import torch

    from runtime.kv.format import kv_format

    fmt = kv_format(kv_dtype, torch.float16, HEAD_DIM)
    blocks = batch * HKV * (context // BLOCK_SIZE)
    return blocks * sum(fmt.block_bytes(HEAD_DIM, BLOCK_SIZE)) + _q_out_bytes(batch)


def sdpa_bytes(batch: int, context: int) -> int:
    """The same for SDPA over a contiguous fp16 K and V."""
    return 2 * batch * HKV * context * HEAD_DIM * 2 + _q_out_bytes(batch)


def _q_out_bytes(batch: int) -> int:
    return 2 * batch * HQ * HEAD_DIM * 2  # q in, out back, both fp16


def cases() -> list[tuple[str, int, int]]:
    return [(kv, b, ctx) for kv in KV_DTYPES for ctx in CONTEXTS for b in BATCHES]


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy: bytes read + bytes written over the median time."""
    import torch
    from triton.testing import do_bench

    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * COPY_BYTES / ms / 1e6


def _cache(kv_dtype: str, batch: int, context: int, gen):
    """A full random paged cache on the GPU, its shuffled block tables (B, context / BLOCK_SIZE) int32 and
    each sequence's tail slot (B,) int32 (int4; else None)."""
    import torch

    from runtime.kernels.paged import TAIL_DTYPE, LayerKV
    from runtime.kv.format import kv_format

    fmt = kv_format(kv_dtype, torch.float16, HEAD_DIM)
    per_seq = context // BLOCK_SIZE
    shape = (batch * per_seq, HKV, BLOCK_SIZE, fmt.packed_dim(HEAD_DIM))  # (num_blocks, Hkv, bs, packed_dim)
    tables = torch.randperm(shape[0], device=DEVICE, generator=gen).view(batch, per_seq).int()
    if not fmt.quantized:
        k, v = (torch.randn(shape, dtype=torch.float16, device=DEVICE, generator=gen) for _ in range(2))
        return LayerKV(k, v, None, None, fmt.bits), tables, None
    k, v = (torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE, generator=gen) for _ in range(2))
    v_params = _params(shape[:3], fmt.bits, gen)
    if not fmt.channel_keys:
        return LayerKV(k, v, _params(shape[:3], fmt.bits, gen), v_params, fmt.bits), tables, None
    k_params = _params(shape[:2] + (HEAD_DIM,), fmt.bits, gen)  # (num_blocks, Hkv, D, 2): per channel of a block
    tail = torch.randn((batch, HKV, BLOCK_SIZE, HEAD_DIM), device=DEVICE, generator=gen).to(TAIL_DTYPE)
    tails = torch.arange(batch, dtype=torch.int32, device=DEVICE)
    return LayerKV(k, v, k_params, v_params, fmt.bits, tail), tables, tails


def _params(shape: tuple[int, ...], bits: int, gen):
    """(…, 2) fp16 [scale, zero]: scales in [0.005, 0.025), zero centring the codes' range on 0."""
    import torch

    scale = torch.rand(shape, device=DEVICE, generator=gen) * 0.02 + 0.005
    return torch.stack([scale, -scale * ((1 << bits) - 1) / 2], dim=-1).half()


def _contiguous(kv, tables, tails):
    """K and V of every sequence as fp16 (B, Hkv, L, D), dequantized one sequence at a time by the reference."""
    import torch

    from runtime.kernels.reference import gather_kv

    batch, per_seq = tables.shape
    k = torch.empty(batch, HKV, per_seq * BLOCK_SIZE, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    v = torch.empty_like(k)
    for b, table in enumerate(tables):
        tail = -1 if tails is None else int(tails[b])
        k[b], v[b] = gather_kv(kv, table, per_seq * BLOCK_SIZE, torch.float16, tail)
    return k, v


def measure(kv_dtype: str, batch: int, context: int, copy_gbps: float) -> dict:
    """One row: kernel and SDPA times, GB/s, share of copy bandwidth, splits, and their disagreement."""
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from runtime.kernels.decode_attention import decode_attention, pick_num_splits

    gen = torch.Generator(DEVICE).manual_seed(batch * 100003 + context)
    kv, tables, tails = _cache(kv_dtype, batch, context, gen)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, HQ, HEAD_DIM, dtype=torch.float16, device=DEVICE, generator=gen)
    k, v = _contiguous(kv, tables, tails)
    q_g = q.view(batch, HKV, HQ // HKV, HEAD_DIM)  # (B, Hkv, group, D): a group's heads are its query rows
    scale = HEAD_DIM ** -0.5

    def run_kernel():
        return decode_attention(q, kv, tables, lens, scale, None, tails)

    def run_sdpa():
        return F.scaled_dot_product_attention(q_g, k, v, scale=scale)
    ref = run_sdpa().reshape(batch, HQ, HEAD_DIM).float()
    err = ((run_kernel().float() - ref).abs().max() / ref.abs().max()).item()
    ms_k = do_bench(run_kernel, return_mode="median")
    ms_s = do_bench(run_sdpa, return_mode="median")
    gbps = kernel_bytes(kv_dtype, batch, context) / ms_k / 1e6
    return {"kv_dtype": kv_dtype, "batch": batch, "context": context, "kernel_ms": ms_k, "kernel_GBps": gbps,
            "copy_pct": 100 * gbps / copy_gbps, "sdpa_ms": ms_s, "sdpa_GBps": sdpa_bytes(batch, context) / ms_s / 1e6,
            "speedup": ms_s / ms_k, "splits": pick_num_splits(batch, HKV, context), "rel_err": err}


def _fits(kv_dtype: str, batch: int, context: int) -> bool:
    import torch

    torch.cuda.empty_cache()
    need = kernel_bytes(kv_dtype, batch, context) + sdpa_bytes(batch, context)
    return need <= MEM_FRACTION * torch.cuda.mem_get_info()[0]


def _table(rows: list[dict], device: str, copy_gbps: float, skipped: list[str]) -> str:
    lines = [f"Paged decode attention (Hq={HQ}, Hkv={HKV}, D={HEAD_DIM}, block {BLOCK_SIZE}) vs torch SDPA on "
             f"{device}; copy bandwidth {copy_gbps:.0f} GB/s", "",
             "SDPA reads the fp16 version of the same tokens for every KV dtype (int8/int4 rows included).", "",
             "| KV | batch | context | kernel ms | kernel GB/s | % copy BW (target ≥ 80 at ≥ 4k) | "
             "SDPA (fp16) ms | SDPA GB/s | speedup | splits | rel err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kv_dtype']} | {r['batch']} | {r['context']} | {r['kernel_ms']:.4f} | "
                     f"{r['kernel_GBps']:.0f} | {r['copy_pct']:.0f} | {r['sdpa_ms']:.4f} | {r['sdpa_GBps']:.0f} | "
                     f"{r['speedup']:.2f}× | {r['splits']} | {r['rel_err']:.1e} |")
    if skipped:
        lines += ["", f"Skipped (cache + fp16 copy over {MEM_FRACTION:.0%} of free GPU memory): {', '.join(skipped)}"]
    return "\n".join(lines)


def dry_run() -> None:
    """The planned cases and the bytes each side is credited with; needs no GPU."""
    print("| KV | batch | context | kernel MB | SDPA (fp16) MB |\n|---|---:|---:|---:|---:|")
    for kv_dtype, batch, context in cases():
        print(f"| {kv_dtype} | {batch} | {context} | {kernel_bytes(kv_dtype, batch, context) / 1e6:.1f} | "
              f"{sdpa_bytes(batch, context) / 1e6:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows (device, copy bandwidth) as JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown here")
    ap.add_argument("--dry-run", action="store_true", help="print the cases and byte counts, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        dry_run()
        return
    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_attention: needs a CUDA GPU with compiled Triton kernels (TRITON_INTERPRET unset); skipping")
        sys.exit(0)
    device, copy_gbps = torch.cuda.get_device_name(), copy_bandwidth()
    rows, skipped = [], []
    for kv_dtype, batch, context in cases():
        if _fits(kv_dtype, batch, context):
            rows.append(measure(kv_dtype, batch, context, copy_gbps))
        else:
            skipped.append(f"{kv_dtype} B={batch} L={context}")
    table = _table(rows, device, copy_gbps, skipped)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "copy_GBps": copy_gbps, "rows": rows, "skipped": skipped},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
