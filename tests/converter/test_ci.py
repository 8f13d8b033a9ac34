"""What CI conversion jobs rely on: a cache key, an up-to-date exit, distinct exit codes, one JSON
object, progress lines in logs, and a killed conversion that resumes to the same bytes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.cli import main as tpconv
from formats.manifest import load_manifest
from tests.converter.test_multi_tp import _all_bytes

ROOT = Path(__file__).resolve().parents[2]


def run(*args):
    return CliRunner().invoke(tpconv, [str(a) for a in args])


def key(src, *options) -> str:
    out = run("key", src, *options)
    assert out.exit_code == 0, out.output
    return out.stdout.strip()


def test_key_changes_with_every_byte_changing_input_and_nothing_else(tiny, tmp_path):
    src = tiny("llama", num_layers=2)
    base = key(src, "--tp", "2")
    assert len(base) == 64 and key(src, "--tp", "2") == base
    options = [["--tp", "1"], ["--tp", "2", "--pp", "2"], ["--tp", "2", "--pp-layers", "1,1"],
               ["--tp", "2", "--dtype", "bfloat16"], ["--tp", "2", "--model-format", "hf"], ["--tp", "2", "--ep"]]
    keys = {key(src, *o) for o in options}
    assert base not in keys and len(keys) == len(options)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        path = src / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of one source file
        assert key(src, "--tp", "2") != base, name
        path.write_bytes(original)
    assert key(src, "--tp", "2") == base
    (src / ".cache").mkdir()  # hidden and nested entries are not read by the converter, nor keyed
    (src / ".cache" / "x").write_text("y")
    assert key(src, "--tp", "2") == base


def test_manifest_records_the_key_and_an_up_to_date_target_exits_at_once(tiny, tmp_path, monkeypatch):
    src, ws = tiny("llama", num_layers=2), tmp_path / "ws"
    first = run("convert", src, "-o", ws, "--tp", "2", "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["key"] == load_manifest(ws).cache_key == key(src, "--tp", "2")
    before = _all_bytes(ws)

    import converter.convert
    monkeypatch.setattr(converter.convert, "open_source", lambda *a: pytest.fail("an up-to-date check read the source"))
    again = run("convert", src, "-o", ws, "--tp", "2", "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["status"] == "up to date" and summary["ranks"] == json.loads(first.stdout)["ranks"]
    assert "up to date" in run("convert", src, "-o", ws, "--tp", "2").stdout
    assert _all_bytes(ws) == before

    other = run("convert", src, "-o", ws, "--tp", "1")  # other options: not this workspace
    assert other.exit_code == 2 and "its cache key differs" in other.output and "--force" in other.output
    shard = ws / "rank1" / "layer-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))  # same key, but it no longer verifies
    stale = run("convert", src, "-o", ws, "--tp", "2")
    assert stale.exit_code == 2 and "no longer verifies: rank1/layer-00001.safetensors" in stale.output


def test_force_converts_an_up_to_date_target_again(tiny, tmp_path):
    src, ws = tiny("llama", num_layers=1), tmp_path / "ws"
    assert run("convert", src, "-o", ws).exit_code == 0
    forced = run("convert", src, "-o", ws, "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["status"] == "converted"


def test_several_tp_are_up_to_date_together(tiny, tmp_path):
    src, out = tiny("llama", num_layers=1), tmp_path / "out"
    first = run("convert", src, "-o", out, "--tp", "1,2", "--json")
    assert first.exit_code == 0, first.output
    again = json.loads(run("convert", src, "-o", out, "--tp", "1,2", "--json").stdout)
    assert again["status"] == "up to date" and again["key"] == json.loads(first.stdout)["key"] == key(src, "--tp", "1,2")
    assert [w["key"] for w in again["workspaces"]] == [key(src, "--tp", "1"), key(src, "--tp", "2")]


def test_every_exit_code_from_a_real_input(tiny, tmp_path, monkeypatch):
    src = tiny("llama", num_layers=1)
    assert run("convert", src, "-o", tmp_path / "ok").exit_code == 0
    assert run("convert", src, "-o", tmp_path / "bad-tp", "--tp", "3").exit_code == 2
    broken = tiny("llama", num_layers=1, vocab=300)
    (broken / "config.json").write_text("{")
    assert run("convert", broken, "-o", tmp_path / "bad-src").exit_code == 3
    shard = tmp_path / "ok" / "rank0" / "layer-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    assert run("verify", tmp_path / "ok").exit_code == 4
    # 5 (out of space): test_errors.test_full_disk_cleans_temp_dir, with a real file size limit

    import converter.convert
    monkeypatch.setattr(converter.convert, "plan_stages", lambda *a: 1 / 0)  # a bug, not the user's input
    crashed = run("convert", src, "-o", tmp_path / "bug", "--json")
    assert crashed.exit_code == 1 and "internal error (ZeroDivisionError" in crashed.output
    assert json.loads(crashed.stdout) == {"status": "error", "exit_code": 1, "error": json.loads(crashed.stdout)["error"]}
    assert not (tmp_path / "bug").exists()


def test_json_error_object_and_progress_lines(tiny, tmp_path):
    src = tiny("llama", num_layers=2)
    bad = run("convert", src, "-o", tmp_path / "ws", "--tp", "3", "--json")
    err = json.loads(bad.stdout)
    assert (err["status"], err["exit_code"]) == ("error", 2) and "valid --tp values" in err["error"]
    ok = run("convert", src, "-o", tmp_path / "ws", "--tp", "2", "--json")
    lines = [ln for ln in ok.stderr.splitlines() if ln.startswith("tpconv: [")]
    assert [ln.split("]")[0] for ln in lines] == [f"tpconv: [{i}/4" for i in range(1, 5)]  # embed, 2 layers, head
    assert "layer-00001.safetensors" in lines[2] and ok.stdout.lstrip().startswith("{")
    summary = json.loads(ok.stdout)
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and all(len(r["sha256"]) == 64 for r in summary["ranks"])
    assert summary["warnings"] == [] and summary["peak_rss_bytes"] > 0


_KILL_AFTER = """
import os, signal, sys
import converter.shards as shards
real, count = shards.write_safetensors, [0]
def write_then_die(*a, **k):
    out = real(*a, **k)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
shards.write_safetensors = write_then_die
from converter.cli import main
sys.argv = ["tpconv"] + sys.argv[1:]
main()
"""


def _killed(src, dst, after: int, *options):
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, "convert", str(src), "-o", str(dst), *options],
                          cwd=ROOT, env={**os.environ, "KILL_AFTER": str(after)}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not dst.exists()


def test_killed_conversion_resumes_to_the_same_bytes(tiny, tmp_path):
    src = tiny("llama", num_layers=4)
    assert run("convert", src, "-o", tmp_path / "clean", "--tp", "2").exit_code == 0
    _killed(src, tmp_path / "ws", 7, "--tp", "2")  # embedding + 2.5 layers on 2 ranks
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".ws.tpconv-tmp-")]
    victim = leftover / "rank0" / "layer-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x07")  # a kept file must still hash as journaled
    resumed = run("convert", src, "-o", tmp_path / "ws", "--tp", "2", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    # 7 files written, the 7th killed before its journal line (as if cut mid-write), one spoiled: 5 kept
    assert json.loads(resumed.stdout)["resumed_files"] == 5
    assert _all_bytes(tmp_path / "ws") == _all_bytes(tmp_path / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "ws"]


def test_resume_keeps_nothing_from_other_options(tiny, tmp_path):
    src = tiny("llama", num_layers=4)
    _killed(src, tmp_path / "ws", 5, "--tp", "2")
    resumed = run("convert", src, "-o", tmp_path / "ws", "--tp", "2", "--dtype", "bfloat16", "--resume", "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["resumed_files"] == 0
    assert run("convert", src, "-o", tmp_path / "clean", "--tp", "2", "--dtype", "bfloat16").exit_code == 0
    assert _all_bytes(tmp_path / "ws") == _all_bytes(tmp_path / "clean")
