"""`tprun serve|generate|plan ./hf-model --tp N`: the checkpoint is converted once by tpconv in its own process,
then reused while it does not change; without tpconv the user gets the command to run."""
import json

from click.testing import CliRunner

from runtime.cli import main


def test_a_checkpoint_is_converted_once_then_reused_then_reconverted_when_it_changes(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TPDEPLOY_CACHE", str(tmp_path / "cache"))
    src = tiny("llama", heads=4, kv_heads=2)
    plan = ["plan", str(src), "--gpu-mem", "1GiB", "--tp", "2", "--json"]
    first = CliRunner().invoke(main, plan)
    assert first.exit_code == 0, first.output
    assert "is a Hugging Face checkpoint: converting it for tp 2" in first.stderr and "wrote " in first.stderr
    assert len(json.loads(first.stdout)["ranks"]) == 2
    (ws,) = (tmp_path / "cache" / "workspaces").iterdir()
    assert ws.name.endswith("-tp2") and (ws / "manifest.json").is_file()
    again = CliRunner().invoke(main, plan)
    assert again.exit_code == 0 and "up to date" in again.stderr and "wrote " not in again.stderr
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rope_theta": 20000.0}))
    changed = CliRunner().invoke(main, plan)
    assert changed.exit_code == 0 and "is stale" in changed.stderr and "wrote " in changed.stderr
    out = CliRunner().invoke(main, ["generate", str(src), "--tp", "2", "--prompt", "hi", "--max-tokens", "3",
                                    "--device", "cpu", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout.splitlines()[-1])["completion_tokens"] == 3, out.output


def test_without_tpconv_the_user_gets_the_command(tiny, tmp_path, monkeypatch):
    import runtime.worker.autoconvert as autoconvert

    monkeypatch.setenv("TPDEPLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(autoconvert, "tpconv_command", lambda: None)
    src = tiny("llama")
    out = CliRunner().invoke(main, ["plan", str(src), "--gpu-mem", "1GiB"])
    assert out.exit_code == 2 and "tpconv is not installed" in out.output
    assert f"tpconv convert {src.resolve()} -o " in out.output and "--tp 1" in out.output
