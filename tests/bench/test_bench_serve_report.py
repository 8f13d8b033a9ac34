"""The serving benchmark's arithmetic and tables, on made-up numbers (no server, no vLLM)."""
from __future__ import annotations

import pytest

from tests.bench import bench_serve, peer_vllm
from tests.bench.serve_long import bucket_medians


def test_gaps_go_to_the_bucket_of_the_chunk_they_precede():
    # chunk 1 is the TTFT; the gap before chunk c (c >= 2) is gaps[c - 2] and belongs to bucket (c - 1) // 4
    gaps = [[0.001 * c for c in range(2, 13)]]  # chunks 2..12 of a 12-token output, bucket size 4
    out = bucket_medians(gaps, tokens=12, bucket=4)
    assert [(b["first"], b["last"], b["gaps"]) for b in out] == [(1, 4, 3), (5, 8, 4), (9, 12, 4)]
    assert [b["itl_median_ms"] for b in out] == pytest.approx([3.0, 6.5, 10.5])


def test_levels_parse_and_reject():
    assert bench_serve.parse_levels("1,8,32") == (1, 8, 32)
    for bad in ("", "0", "1,x", "-4"):
        with pytest.raises(SystemExit, match="--levels"):
            bench_serve.parse_levels(bad)


def _row(c: int, tok_s: float, ttft: float, itl: float) -> dict:
    return {"concurrency": c, "requests": 32, "tok_s": tok_s, "ttft_median_s": ttft, "itl_median_ms": itl}


def _result(with_peer: bool) -> dict:
    tprun = {"startup_s": 3.0, "peak_rss_gib": 0.9,
             "rows": [_row(1, 40.0, 0.10, 25.0), _row(8, 110.0, 0.2, 60.0), _row(32, 250.0, 0.5, 120.0)]}
    vllm = {"startup_s": 60.0, "peak_rss_gib": 4.5, "version": "0.32.0",
            "compile": "loaded its compiled CPU graph from its cache",
            "rows": [_row(1, 30.0, 0.05, 33.0), _row(8, 100.0, 0.1, 80.0), _row(32, 200.0, 0.4, 150.0)]}
    return {"model": "m", "tp": 1, "kv_dtype": "auto", "max_tokens": 64, "max_model_len": 1024, "kv_tokens": 32768,
            "requests": 32, "baseline": {"tok_s": 40.0, "threads": 2}, "tprun": tprun,
            "vllm": vllm if with_peer else None}


def test_peer_table_has_ratios_and_every_target():
    text = "\n".join(bench_serve.report(_result(with_peer=True), {"cpu": "cpu", "cores": 2}))
    assert "| 1 | 32 | 40.0 | 30.0 | 1.33× | 1.00× | 0.10 | 0.05 | 2.00× | 25.0 | 33.0 | 0.76× |" in text
    assert "| tprun/vLLM | 0.05× | 0.20× |" in text
    assert "Target: >= 1.3× vLLM tok/s at concurrency 1: measured 1.33×, met." in text
    assert "Target: >= 1.2× vLLM tok/s at concurrency 8: measured 1.10×, missed." in text
    assert "Target: >= 1.2× vLLM tok/s at concurrency 32: measured 1.25×, met." in text
    assert "Target: startup <= 0.1× vLLM's: measured 0.05×, met." in text
    assert "Target: peak RSS <= 0.3× vLLM's: measured 0.20×, met." in text
    assert "peer: vLLM 0.32.0 (CPU build), fp32, which loaded its compiled CPU graph from its cache." in text


def test_without_peer_the_table_says_how_to_get_one():
    text = "\n".join(bench_serve.report(_result(with_peer=False), {"cpu": "cpu", "cores": 2}))
    assert "no peer (make peer-vllm)" in text
    assert "vLLM" not in text
    assert "| 32 | 32 | 250.0 | 6.25× | 0.50 | 120.0 |" in text


def test_how_vllm_got_its_graph_is_read_from_its_log():
    saved = "INFO [decorators.py:743] [backbone] saved AOT compiled function to /x/model\n"
    failed = "WARNING [decorators.py:333] [backbone] Compiling model again due to a load failure from /x/model\n"
    loaded = "INFO [decorators.py:320] [backbone] Directly load AOT compilation from path /x/model\n"
    assert peer_vllm.compile_note(saved) == "compiled its CPU graph at start (no compile cache yet)"
    assert peer_vllm.compile_note(failed + saved).endswith("(its compile cache failed to load)")
    assert peer_vllm.compile_note(loaded) == "loaded its compiled CPU graph from its cache"
