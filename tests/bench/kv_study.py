"""Which 4-bit KV format loses least perplexity: every variant beside fp32 KV, in one run (issue 16).

Runs the serving path's perplexity (``runtime.perplexity``, what ``tprun perplexity`` prints) over
SmolLM2-135M-Instruct (fp32 weights, tp 1, CPU) on three texts:

* ``own``: ``tests/data/english.txt``, the project's own English prose;
* ``code``: Python's ``textwrap.py`` from the running interpreter's standard library (PSF licence;
  code and docstrings, a different style, on every machine that runs the project);
* ``gpl3``: ``/usr/share/common-licenses/GPL-3``, legal English none of the variants was tuned on:
  the figure the target is judged by, at context 512 and 2048.

Two kinds of rows:

* ``real`` rows load the cache in that ``--kv-dtype`` and run the runtime's own kernels (torch on CPU);
* ``sim`` rows are torch-only simulations of formats that were measured but not all kept: the cache
  is fp32 and each step's K (rotated by the Hadamard matrix, as the real formats store it) and/or V
  is quantized and dequantized before it is written (``PagedKVCache.attend`` wrapped). A ``sim`` row of
  a kept format equals its ``real`` row to rounding, which checks the simulation.

``K``/``V``/``KV`` columns quantize keys only, values only, or both. Prints perplexity change vs fp32
KV as a markdown table. Not a test: nothing is asserted. ``make bench-kv`` runs the kept format's sim and the
real int8/int4 rows at 512 and 2048 (about 15 minutes on 2 vCPUs); ``--all`` every variant measured for
``docs/kv-cache.md`` (hours); ``--only A|B`` chosen ones.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch

from runtime.kernels.paged import dequantize, quantize
from runtime.kv.format import KV_DTYPES, key_rotation

ROOT = Path(__file__).resolve().parents[2]
TEXTS = {"own": ROOT / "tests" / "data" / "english.txt", "code": Path(textwrap.__file__),
         "gpl3": Path("/usr/share/common-licenses/GPL-3")}
Fake = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (T, H, D) values, (T,) positions -> dequantized


def uniform(bits: int, group: int | None = None) -> Fake:
    """Per-token (per-group of ``group`` channels) asymmetric min-max, the runtime's own quantize."""
    def fake(x, pos):
        g = group or x.shape[-1]
        xs = x.unflatten(-1, (-1, g))  # (T, H, D/g, g)
        return dequantize(*quantize(xs, bits), bits, x.dtype).flatten(-2)
    return fake


def lloyd_max_levels(n: int = 16, iterations: int = 500) -> list[float]:
    """The n-level Lloyd-Max quantizer of N(0, 1): each level the mean of its cell, each edge the midpoint
    (iterated from a uniform start; converges to the textbook table, ±0.128 ... ±2.733 for 16 levels)."""
    levels = torch.linspace(-2.5, 2.5, n, dtype=torch.float64)
    for _ in range(iterations):
        edges = torch.cat([torch.tensor([-math.inf]), (levels[1:] + levels[:-1]) / 2, torch.tensor([math.inf])])
        pdf = torch.exp(-edges ** 2 / 2) / math.sqrt(2 * math.pi)  # E[x; a < x < b] = pdf(a) - pdf(b)
        mass = torch.special.ndtr(edges[1:]) - torch.special.ndtr(edges[:-1])
        levels = (pdf[:-1] - pdf[1:]) / mass
    return levels.tolist()


LLOYD_MAX_4BIT = lloyd_max_levels()


def lloyd(group: int | None = None) -> Fake:
    """16 Lloyd-Max levels for N(0, 1) on (x - mean) / std of each token (or group), fp16 mean and std."""
    levels = torch.tensor(LLOYD_MAX_4BIT)
    edges = (levels[1:] + levels[:-1]) / 2

    def fake(x, pos):
        xs = x.float().unflatten(-1, (-1, group or x.shape[-1]))
        mu = xs.mean(-1, keepdim=True).half().float()
        sd = xs.std(-1, correction=0, keepdim=True).clamp_min(2.0 ** -14).half().float()
        codes = torch.bucketize((xs - mu) / sd, edges)
        return (levels[codes] * sd + mu).flatten(-2).to(x.dtype)
    return fake


def sinks(n: int, inner: Fake) -> Fake:
    """The first ``n`` positions of a sequence kept in fp16, the rest through ``inner``."""
    def fake(x, pos):
        keep = (pos < n)[:, None, None]
        return torch.where(keep, x.half().to(x.dtype), inner(x, pos))
    return fake


def clipped(bits: int = 4, ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> Fake:
    """Per-row (last dim) asymmetric min-max with the range shrunk about its middle by the ratio that gives
    the least squared error (searched per row at write time: no calibration, no extra bytes)."""
    def fake(x, pos):
        x32 = x.float()
        lo, hi = x32.amin(-1, keepdim=True), x32.amax(-1, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        qmax, best, err = (1 << bits) - 1, None, None
        for r in ratios:
            scale = (2 * half * r / qmax).clamp(2.0 ** -14, 65504).half().float()
            zero = (mid - half * r).half().float()
            y = torch.floor((x32 - zero) / scale + 0.5).clamp(0, qmax) * scale + zero
            e = ((y - x32) ** 2).sum(-1, keepdim=True)
            best, err = (y, e) if best is None else (torch.where(e < err, y, best), torch.minimum(e, err))
        return best.to(x.dtype)
    return fake


def per_channel_block_with(inner: Fake, block: int = 64) -> Fake:
    """KIVI-style: ``inner`` (a per-row quantizer) applied to each channel's run of tokens within each block
    of ``block`` tokens (it needs the whole block: simulated over positions, which a cache can only do once
    a block is full)."""
    def fake(x, pos):
        out = x.clone()
        for b in torch.unique(pos // block).tolist():
            rows = (pos // block) == b
            out[rows] = inner(x[rows].transpose(0, 2), pos).transpose(0, 2)
        return out
    return fake


def per_channel_block(block: int = 64) -> Fake:
    """Plain min-max int4 per channel over each block."""
    return per_channel_block_with(uniform(4), block)


def rotated(inner: Fake) -> Fake:
    """``inner`` on x multiplied by the Hadamard matrix (and back, R R = I): for values, what a rotated V
    cache stores; for keys, which ``wrap`` has rotated already, the keys as the model made them."""
    def fake(x, pos):
        r = key_rotation(x.shape[-1], x.dtype, x.device)
        return inner(x @ r, pos) @ r
    return fake


_LAYER = [0]  # the layer being written, set by ``wrap`` (for per-layer variants)


def first_layers(n: int, early: Fake, inner: Fake) -> Fake:
    """``early`` in the first ``n`` layers, ``inner`` in the rest."""
    def fake(x, pos):
        return (early if _LAYER[0] < n else inner)(x, pos)
    return fake


def jitter(inner: Fake) -> Fake:
    """``inner`` after a relative 1e-6 perturbation: how far perplexity moves when a few codes at a
    rounding boundary flip (the noise floor of every comparison below)."""
    def fake(x, pos):
        gen = torch.Generator().manual_seed(int(pos[0]))
        return inner(x * (1 + 1e-6 * torch.randn(x.shape, generator=gen)), pos)
    return fake


# name -> (key fake-quant, value fake-quant, bytes per token-head K + V at D=64 incl. parameters,
# whether the values differ from the current int4 and need a V column of their own)
SIMS: dict[str, tuple[Fake, Fake, float, bool]] = {
    "int4 uniform (current)": (uniform(4), uniform(4), 36 + 36, True),
    "int4 uniform, 1e-6 jitter": (jitter(uniform(4)), jitter(uniform(4)), 36 + 36, True),
    "1 Lloyd-Max keys": (lloyd(), uniform(4), 36 + 36, False),
    "1 Lloyd-Max keys and values": (lloyd(), lloyd(), 36 + 36, True),
    "2 uniform keys g32": (uniform(4, 32), uniform(4), 40 + 36, False),
    "2 uniform keys g16": (uniform(4, 16), uniform(4), 48 + 36, False),
    "1+2 Lloyd-Max keys g32": (lloyd(32), uniform(4), 40 + 36, False),
    "3 sinks 16 + uniform": (sinks(16, uniform(4)), sinks(16, uniform(4)), 36 + 36, True),
    "3 sinks 16 + Lloyd-Max keys": (sinks(16, lloyd()), sinks(16, uniform(4)), 36 + 36, False),
    "4 k8v4": (uniform(8), uniform(4), 68 + 36, False),
    "5 per-channel keys per 64-token block": (per_channel_block(), uniform(4), 36 + 36, False),
    "5 unrotated": (rotated(per_channel_block()), uniform(4), 36 + 36, False),
    "5 + values g32": (per_channel_block(), uniform(4, 32), 36 + 40, False),
    "5 + sinks 16": (sinks(16, per_channel_block()), sinks(16, uniform(4)), 36 + 36, False),
    "5 + clipped values": (per_channel_block(), clipped(), 36 + 36, False),
    "6 + values clipped": (per_channel_block_with(clipped()), clipped(), 36 + 36, False),
    "6 + values g32": (per_channel_block_with(clipped()), uniform(4, 32), 36 + 40, False),
    "5 + clipped values g32": (per_channel_block(), lambda x, p: clipped()(x.unflatten(-1, (-1, 32)), p).flatten(-2),
                               36 + 40, False),
    "5 + rotated values": (per_channel_block(), rotated(uniform(4)), 36 + 36, False),
    "5 + rotated clipped values": (per_channel_block(), rotated(clipped()), 36 + 36, False),
    "5 + rotated values g32": (per_channel_block(), rotated(uniform(4, 32)), 36 + 40, False),
    "6 clipped keys (5 with each channel's range clipped)": (per_channel_block_with(clipped()), uniform(4), 36 + 36, False),
    "6 + values rotated (= int4)": (per_channel_block_with(clipped()), rotated(uniform(4)), 36 + 36, False),
    "5 + layer 0 int8": (first_layers(1, uniform(8), per_channel_block()), first_layers(1, uniform(8), uniform(4)),
                          36 + 36 + 64 / 30, False),
    "5 + layers 0-1 int8": (first_layers(2, uniform(8), per_channel_block()), first_layers(2, uniform(8), uniform(4)),
                             36 + 36 + 128 / 30, False),
}
KEPT = "6 + values rotated (= int4)"  # the sim of today's int4: its real row should agree within noise
REAL = tuple(k for k in ("int8", "int4") if k in KV_DTYPES)


def wrap(cache, key: Fake | None, value: Fake | None) -> None:
    """Make ``cache.attend`` fake-quantize the step's K (in the rotated basis) and V before storing them."""
    attend = type(cache).attend.__get__(cache)
    r = key_rotation(cache.shape.head_dim, torch.float32, torch.device("cpu"))

    def fake_attend(layer, q, k, v, pb):
        assert pb.seq_lens.shape[0] == 1, "perplexity prefills one window at a time"
        pos = pb.seq_lens[0] - k.shape[0] + torch.arange(k.shape[0])  # (T,) positions of the new tokens
        _LAYER[0] = layer
        if key is not None:
            k = key(k @ r, pos) @ r  # r is symmetric and orthonormal: r @ r == I
        if value is not None:
            v = value(v, pos)
        return attend(layer, q, k, v, pb)
    cache.attend = fake_attend


def run(ws: Path, kv: str, ids: dict[str, list[int]], contexts: list[int], fakes=None) -> dict[tuple, float]:
    """Perplexity of every (text, context) with one LLM; ``fakes``: label -> (key, value) simulations."""
    from runtime.api import LLM
    from runtime.config import CacheConfig
    from runtime.perplexity import perplexity

    out = {}
    with LLM(ws, device="cpu", max_batch_size=1, cache=CacheConfig(kv, kv_cache_tokens=max(contexts))) as llm:
        cache = llm.driver.runner.cache
        for label, (key, value) in (fakes or {kv: (None, None)}).items():
            cache.__dict__.pop("attend", None)
            if key is not None or value is not None:
                wrap(cache, key, value)
            for name, toks in ids.items():
                for ctx in contexts:
                    if len(toks) >= ctx:
                        out[label, name, ctx] = perplexity(llm, toks, ctx, min(ctx, 512)).perplexity
            print(f"  {label}: done", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="512,2048", help="window lengths (comma-separated)")
    ap.add_argument("--only", default=KEPT, help="sim rows whose name contains one of these (|-separated); "
                                                  "default: the kept format's, beside the real int8 and int4 rows")
    ap.add_argument("--all", action="store_true", help="every sim row (hours on 2 vCPUs), and the real rows")
    ap.add_argument("--both-only", action="store_true", help="only the [KV] rows of the sim variants")
    ap.add_argument("--texts", default=",".join(TEXTS), help="texts to run (comma-separated)")
    args = ap.parse_args()
    from runtime.engine.tokenizer import Tokenizer
    from tests.bench.bench_cpu_int4 import workspaces

    ws = workspaces()["dense"]
    tok = Tokenizer.from_workspace(ws)
    ids = {name: tok.encode(p.read_text(encoding="utf-8")) for name, p in TEXTS.items()
           if p.is_file() and name in args.texts.split(",")}
    contexts = [int(c) for c in args.contexts.split(",")]
    t0 = time.perf_counter()
    fakes = {"fp32": (None, None)}
    for name, (k, v, _, own_v) in SIMS.items():
        if args.all or any(o in name for o in args.only.split("|")):
            if not args.both_only:
                fakes |= {f"{name} [K]": (k, None)} | ({f"{name} [V]": (None, v)} if own_v else {})
            fakes[f"{name} [KV]"] = (k, v)
    ppl = run(ws, "fp32", ids, contexts, fakes)
    for kv in REAL if args.all or args.only == KEPT else ():
        ppl |= run(ws, kv, ids, contexts)
    _report(ppl, ids, contexts, time.perf_counter() - t0)


def _report(ppl: dict[tuple, float], ids: dict[str, list[int]], contexts: list[int], seconds: float) -> None:
    cols = [(n, c) for n in ids for c in contexts if ("fp32", n, c) in ppl]
    print(f"SmolLM2-135M-Instruct fp32 weights, CPU; {seconds:.0f} s. Perplexity change vs fp32 KV.")
    print("| variant | B/token-head K+V (D=64) | " + " | ".join(f"{n} @{c}" for n, c in cols) + " |")
    print("| --- | ---: |" + " ---: |" * len(cols))
    print("| fp32 KV (perplexity) | 256 | " + " | ".join(f"{ppl['fp32', n, c]:.3f}" for n, c in cols) + " |")
    sizes = {name: b for name, (_, _, b, _) in SIMS.items()} | {"int8": 136, "int4": 72}
    for label in dict.fromkeys(k[0] for k in ppl):
        if label == "fp32":
            continue
        base = label.rsplit(" [", 1)[0]
        cells = [f"{ppl[label, n, c] / ppl['fp32', n, c] - 1:+.2%}" if (label, n, c) in ppl else "" for n, c in cols]
        size = sizes.get(base, math.nan)
        print(f"| {label} {'(real)' if label in REAL else '(sim)'} | {size:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
