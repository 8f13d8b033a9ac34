"""Bad input: a clear error naming the problem, exit code != 0, and nothing half-written."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from converter.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


BAD_SOURCE = 3  # docs/ci.md: a checkpoint tpconv cannot read, as against a bad command (2)


def assert_refused(tmp_path, args, pattern, code_expected=2):
    """The exit code, the message matches, and the output directory is exactly as before."""
    before = sorted(os.listdir(tmp_path))
    code, out = run_cli(*args)
    assert code == code_expected, out
    assert out.startswith("tpconv: error:") and re.search(pattern, out), out
    assert sorted(os.listdir(tmp_path)) == before
    return out


def test_missing_config(tiny, tmp_path):
    src = tiny()
    (src / "config.json").unlink()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], r"has no config.json", BAD_SOURCE)
    assert not (tmp_path / "ws").exists()


def test_index_names_missing_shard(tiny, tmp_path):
    src = tiny(shards=2)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], rf"names shard file\(s\) that do not exist: {victim.name}", BAD_SOURCE)


def test_truncated_safetensors_names_file(tiny, tmp_path):
    src = tiny()
    f = src / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], r"model\.safetensors: truncated", BAD_SOURCE)


def test_corrupt_safetensors_header_names_file(tiny, tmp_path):
    src = tiny()
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], r"model\.safetensors: corrupt safetensors header", BAD_SOURCE)


def test_corrupt_bin_names_file(tiny, tmp_path):
    src = tiny(fmt="bin")
    f = src / "pytorch_model.bin"
    os.truncate(f, f.stat().st_size // 2)
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], r"pytorch_model\.bin: cannot read this PyTorch weight file", BAD_SOURCE)


def test_unsupported_architecture_lists_supported(tiny, tmp_path):
    src = tiny()
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"],
                   r"\['GPT2LMHeadModel'\] is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM", BAD_SOURCE)


def test_heads_not_divisible(tiny, tmp_path):
    src = tiny(heads=4, kv_heads=2, hidden=64)
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws", "--tp", "3"],
                   r"--tp 3 does not divide the 4 attention heads of this model; valid --tp values: 1, 2, 4")


def test_intermediate_not_divisible(tiny, tmp_path):
    src = tiny(intermediate=98)
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws", "--tp", "4"],
                   r"does not divide the intermediate size 98 of this model; valid --tp values: 1, 2")


def test_shape_mismatch_names_tensor(tiny, tmp_path):
    src = tiny()
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"],
                   r"gate_proj.weight' has shape \[96, 64\] but config.json implies \[128, 64\]", BAD_SOURCE)


def test_target_is_a_file(tiny, tmp_path):
    src = tiny()
    (tmp_path / "ws").write_text("not a dir")
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws"], r"is a file, not a directory")
    assert (tmp_path / "ws").read_text() == "not a dir"


def test_existing_target_needs_force(tiny, tmp_path):
    src = tiny()
    assert run_cli("convert", src, "-o", tmp_path / "ws")[0] == 0
    before = (tmp_path / "ws" / "manifest.json").read_bytes()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws", "--tp", "2"], r"already exists and is not up to date \(its cache key differs.*\); pass --force")
    assert (tmp_path / "ws" / "manifest.json").read_bytes() == before
    assert run_cli("convert", src, "-o", tmp_path / "ws", "--tp", "2", "--force")[0] == 0
    assert json.loads((tmp_path / "ws" / "manifest.json").read_text())["tp"] == 2
    assert sorted(os.listdir(tmp_path)) == ["ws"]


def test_unwritable_target(tiny, tmp_path):
    src = tiny()
    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a parent that is a file: mkdir fails for root too
    assert_refused(tmp_path, ["convert", src, "-o", blocker / "ws"], r"blocker is not writable \(not a directory\)")


def test_model_format_awq_insists_on_awq(tiny, tmp_path):
    src = tiny()
    assert_refused(tmp_path, ["convert", src, "-o", tmp_path / "ws", "--model-format", "awq"],
                   r"--model-format awq needs an AWQ checkpoint, found no quantization_config \(an unquantized model\)")


def test_full_disk_cleans_temp_dir(tiny, tmp_path):
    """A real write failure part-way (RLIMIT_FSIZE, EFBIG) removes the temporary directory."""
    src = tiny(num_layers=4)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000)); "
            "from converter.cli import main; sys.argv = ['tpconv'] + sys.argv[1:]; main()")
    proc = subprocess.run([sys.executable, "-c", code, "convert", str(src), "-o", str(tmp_path / "ws")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 5, proc.stderr  # out of space (here: over the file size limit)
    assert "File too large" in proc.stderr and "nothing was left behind" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_killed_conversion_leaves_no_workspace(tiny, tmp_path):
    """SIGKILL mid-way: nothing at the target; the next run removes the dead process's temp dir."""
    src = tiny(num_layers=24, hidden=512, heads=8, kv_heads=4, intermediate=1536)
    proc = subprocess.Popen([sys.executable, "-m", "converter", "convert", str(src), "-o", str(tmp_path / "ws"), "--tp", "2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".ws.tpconv-tmp-{proc.pid}"
    _wait_for(lambda: (tmp / "rank1" / "layer-00002.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ws").exists()
    assert tmp.exists() and not (tmp / "manifest.json").exists()
    assert run_cli("convert", src, "-o", tmp_path / "ws")[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["ws"]


def test_sigterm_cleans_up(tiny, tmp_path):
    src = tiny(num_layers=24, hidden=512, heads=8, kv_heads=4, intermediate=1536)
    proc = subprocess.Popen([sys.executable, "-m", "converter", "convert", str(src), "-o", str(tmp_path / "ws")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (tmp_path / f".ws.tpconv-tmp-{proc.pid}" / "rank0" / "layer-00002.safetensors").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert os.listdir(tmp_path) == []


def _wait_for(cond, proc, timeout=60.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail("conversion finished before it could be interrupted; make the model larger")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("conversion did not start writing in time")
        time.sleep(0.005)
