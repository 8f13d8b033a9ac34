"""A CPU rank keeps freed memory: tensors allocated and freed every step stop costing page faults."""
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Two patterns of a decode step, in a fresh process each (malloc's settings are process-wide): a tensor over
# 32 MiB (glibc always unmaps those), and a layer freeing more than twice its largest tensor at once (glibc's
# dynamic rule trims it). Page faults per repetition, averaged over the last ones.
PROBE = """
import json, resource, sys, torch
from runtime.worker.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "llm":  # what a CPU rank sets up, through the public API
    from runtime.api import LLM
    llm = LLM(sys.argv[2], device="cpu", max_model_len=64)
    llm.generate([[5, 6, 7]])
def faults(step, warm=12, n=4):
    for _ in range(warm):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
def big():
    x = torch.ones(40 << 18)
    del x
torch.ones(1 << 20)
grown = [0]
def layer():  # the tensors grow a little each step, as gathered K/V do with the context
    grown[0] += 1024
    xs = [torch.ones((1 << 20) + grown[0]) for _ in range(3)]
    del xs
print(json.dumps({"kept": kept, "big": faults(big), "layer": faults(layer)}))
"""


def _probe(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    default, kept = _probe("default"), _probe("keep")
    # The control shows the probe can fail: glibc's defaults fault every page (10,240 for 40 MiB) again.
    assert default["big"] > 5000 and default["layer"] > 500, default
    assert kept["kept"] is True
    assert kept["big"] < 100 and kept["layer"] < 100, kept


def test_a_cpu_model_runs_with_freed_memory_kept(tmp_path):
    from converter.convert import ConvertOptions, convert
    from tests.fixtures.tiny import make_tiny

    convert(ConvertOptions(make_tiny(tmp_path / "src", "llama", vocab=301, seed=6), tmp_path / "ws", 1))
    after = _probe("llm", str(tmp_path / "ws"))
    assert after["big"] < 100 and after["layer"] < 100, after
