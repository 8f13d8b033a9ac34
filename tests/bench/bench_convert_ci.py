"""What a CI conversion job pays, on the random ~2 GB fp32 Llama of ``bench_convert`` (16 heads, 8 KV heads):

* ``--tp 1,2,4,8`` in one pass against four separate ``--tp N`` runs (time, peak RSS of the process);
* ``tpconv key`` (hashes the source) and a second ``convert`` that finds the target up to date;
* ``tpconv verify`` (hashes) and ``tpconv verify --numerics`` (first/last layer, embedding, lm_head of
  every rank against the source) on the tp 4 workspace.

Each command runs in a fresh process, ``--reps`` times (median). A script, never a test:
``python -m tests.bench.bench_convert_ci [--markdown PATH]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_convert import TPCONV, as_markdown, as_text, llama_path

ROOT = Path(__file__).resolve().parents[2]
TPS = (1, 2, 4, 8)


def timed(args: list[str]) -> tuple[float, int, str]:
    """Wall seconds, the child's peak RSS (bytes) and its stdout."""
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return wall, int(out.stderr.strip().splitlines()[-1]) * 1024, out.stdout


def median_run(args: list[str], reps: int, before=None) -> tuple[float, int]:
    runs = []
    for _ in range(reps):
        if before:
            before()
        wall, rss, _ = timed(args)
        runs.append((wall, rss))
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    src = llama_path()
    work = Path(tempfile.mkdtemp(prefix="bench-ci-", dir=os.environ.get("TPDEPLOY_CACHE")))
    rows = []
    try:
        one_pass = median_run([TPCONV, "convert", str(src), "-o", str(work / "all"), "--tp", ",".join(map(str, TPS)),
                               "--force"], args.reps)
        separate = [median_run([TPCONV, "convert", str(src), "-o", str(work / f"tp{tp}"), "--tp", str(tp), "--force"],
                               args.reps) for tp in TPS]
        total = sum(s[0] for s in separate)
        rows.append([f"convert --tp {','.join(map(str, TPS))} (one pass)", f"{one_pass[0]:.1f}",
                     f"{one_pass[1] / 1e6:.0f}", f"{total / one_pass[0]:.2f}x faster than the four runs"])
        rows += [[f"convert --tp {tp} (alone)", f"{s[0]:.1f}", f"{s[1] / 1e6:.0f}", ""] for tp, s in zip(TPS, separate)]
        rows.append(["the four separate runs", f"{total:.1f}", f"{max(s[1] for s in separate) / 1e6:.0f}", ""])
        ws = str(work / "tp4")
        for label, cmd in [("key (hash the source)", [TPCONV, "key", str(src), "--tp", "4"]),
                           ("convert, target up to date", [TPCONV, "convert", str(src), "-o", ws, "--tp", "4"]),
                           ("verify (hashes)", [TPCONV, "verify", ws]),
                           ("verify --numerics (hashes + numerics)", [TPCONV, "verify", "--numerics", ws])]:
            wall, rss = median_run(cmd, args.reps)
            rows.append([label, f"{wall:.1f}", f"{rss / 1e6:.0f}", ""])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    head = ["command (2 GB fp32 Llama)", "s (median)", "peak RSS MB", "note"]
    load = os.getloadavg()[0]
    note = f"{args.reps} runs each, median; {os.cpu_count()} CPUs, load average {load:.2f} at the end."
    print(as_text(head, rows) + "\n" + note)
    if args.markdown:
        args.markdown.write_text(as_markdown(head, rows) + "\n\n" + note + "\n")


if __name__ == "__main__":
    sys.exit(main())
