"""Peak memory follows the largest layer, not the model: measured in a fresh process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The interpreter, torch and the page-table/allocator slack of a few hundred tensor allocations.
CONSTANT_SLACK = 48 << 20

PROBE = """
import json, sys, psutil
from converter.convert import ConvertOptions, convert
from converter.writer import peak_rss_bytes
from converter.source import open_source
open_source(sys.argv[1]).checkpoint.close()  # warm imports and lazy modules before the baseline
base = psutil.Process().memory_info().rss
summary = convert(ConvertOptions(sys.argv[1], sys.argv[2], int(sys.argv[3])))
print(json.dumps({"base": base, "peak": peak_rss_bytes(), "reported": summary.peak_rss_bytes}))
"""


@pytest.mark.parametrize("fmt,tp", [("safetensors", 1), ("safetensors", 4), ("bin", 2)])
def test_peak_rss_bounded_by_one_layer(tiny, tmp_path, fmt, tp):
    layers, hidden, inter = 32, 256, 1024
    src = tiny(num_layers=layers, hidden=hidden, heads=8, kv_heads=4, intermediate=inter, vocab=2048, fmt=fmt,
               shards=2 if fmt == "bin" else 1)
    layer_bytes = (2 * hidden * hidden + 2 * hidden * hidden // 2 + 3 * hidden * inter + 2 * hidden) * 4
    model_bytes = sum(f.stat().st_size for f in src.iterdir() if f.suffix in (".safetensors", ".bin"))
    largest = max(layer_bytes, 2048 * hidden * 4)
    assert model_bytes > 20 * largest  # the bound below would be meaningless otherwise
    out = subprocess.run([sys.executable, "-c", PROBE, str(src), str(tmp_path / "ws"), str(tp)], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=300)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    growth = rss["peak"] - rss["base"]
    print(f"growth {growth / 1e6:.1f} MB, largest layer {largest / 1e6:.1f} MB")
    assert growth <= 1.5 * largest + CONSTANT_SLACK, (
        f"peak grew {growth / 1e6:.1f} MB for a largest layer of {largest / 1e6:.1f} MB (model {model_bytes / 1e6:.0f} MB)")
