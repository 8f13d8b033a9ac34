"""``make gpu-check`` without a GPU: the no-CUDA exit, the dry run's report (every section, every row),
a budget too small to run anything, and the parsing of pytest's output."""
import json
import math

from tests.bench import gpu_check

SECTIONS = ("### 1. Device", "### 2. Kernel tests", "### 3. Kernel benchmarks", "### 4. End-to-end decode",
            "### 5. Decode bandwidth roofline", "### 6. The plan's reserve", "### Summary")


def _run(tmp_path, *extra):
    md = tmp_path / "report.md"
    rc = gpu_check.main(["--dry-run", "--in-process", "--markdown", str(md), "--log", str(tmp_path / "log"),
                         "--json", str(tmp_path / "raw.json"), *extra])
    return rc, md.read_text(), json.loads((tmp_path / "raw.json").read_text())


def test_without_cuda_nothing_is_measured(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "_has_cuda", lambda: False)
    assert gpu_check.main([]) == 0
    assert capsys.readouterr().out.strip() == gpu_check.NO_CUDA


def test_dry_run_reports_every_section_in_order(tmp_path):
    rc, md, raw = _run(tmp_path)
    assert rc == 0, md
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    status = {k: r["status"] for k, r in raw.items()}
    assert status == {"device": "pass", "prepare": "pass", "decode_tprun": "pass", "decode_hf": "pass",
                      "roofline": "pass", "reserve": "pass", "bench_attention": "skip", "bench_w4a16": "skip",
                      "bench_moe": "skip",
                      "kernel_tests": "skip"}
    decoded = raw["decode_tprun"]["data"]["rows"] + raw["decode_hf"]["data"]["rows"]
    assert {(r["kv"], r["batch"]) for r in decoded} >= {(kv, b) for kv in ("fp16", "int8", "int4") for b in (1, 2)}
    # ms_step is a difference of two timings: on a loaded CPU with the dry run's tiny sizes it can be <= 0
    assert all(r["short_rows"] == 0 and math.isfinite(r["ms_step"]) for r in decoded)
    assert len(raw["roofline"]["data"]["rows"]) == len(decoded)
    assert [r["scenario"] for r in raw["reserve"]["data"]["rows"]] == ["prefill", "prompt_logits", "decode"]
    for text in ("transformers generate", "identical tokens", "Copy bandwidth", "one decode step of 2 sequences"):
        assert text in md


def test_a_step_that_cannot_run_is_recorded_and_the_others_still_are(tmp_path):
    rc, md, raw = _run(tmp_path, "--budget", "0")
    assert rc == 1
    assert raw["device"]["status"] == "skip" and "budget left" in raw["device"]["note"]
    assert raw["reserve"]["status"] == "fail" and "prepare" in raw["reserve"]["note"]
    assert all(s in md for s in SECTIONS)


def test_pytest_counts_from_the_summary_or_from_the_progress_marks():
    done = "..F\nFAILED tests/x.py::test_a - AssertionError\n1 failed, 2 passed, 1 skipped in 3.50s\n"
    assert gpu_check.parse_pytest(done) == ({"failed": 1, "passed": 2, "skipped": 1},
                                            ["FAILED tests/x.py::test_a - AssertionError"])
    killed = "........s.  [ 40%]\n....\n"
    assert gpu_check.parse_pytest(killed) == ({"passed": 13, "skipped": 1}, [])
