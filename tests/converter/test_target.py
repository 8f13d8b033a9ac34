"""Where a workspace may be written: --force replaces only workspaces, never the source, and every
check on the target and the source happens before the first byte is written."""
import json
import os
from pathlib import Path

import pytest

from tests.converter.test_errors import run_cli


def _refused(args, pattern, expected=2):
    code, out = run_cli(*args)
    assert code == expected, out
    assert out.startswith("tpconv: error:") and pattern in out, out
    assert "Traceback" not in out
    return out


def _unchanged(src: Path):
    """Snapshot of a source directory: every file name and its bytes."""
    return {str(p.relative_to(src)): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}


def test_force_onto_the_source_keeps_it(tiny):
    src = tiny()
    before = _unchanged(src)
    out = _refused(["convert", src, "-o", src, "--force"], "is the source checkpoint directory")
    assert "choose a directory outside" in out
    assert _unchanged(src) == before


def test_target_inside_the_source(tiny):
    src = tiny()
    before = _unchanged(src)
    _refused(["convert", src, "-o", src / "sub", "--force"], "is inside the source checkpoint directory")
    assert _unchanged(src) == before and not (src / "sub").exists()
    assert not [p for p in src.iterdir() if "tpconv" in p.name]


def test_target_containing_the_source(tmp_path):
    from tests.fixtures.tiny import make_tiny

    src = make_tiny(tmp_path / "outer" / "src")  # an outer directory of this test's own, should the check fail
    before = _unchanged(src)
    _refused(["convert", src, "-o", tmp_path / "outer", "--force"], "contains the source checkpoint directory")
    assert _unchanged(src) == before


def test_symlink_to_the_source(tiny, tmp_path):
    src = tiny()
    before = _unchanged(src)
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    _refused(["convert", src, "-o", tmp_path / "link", "--force"], "is the source checkpoint directory")
    assert _unchanged(src) == before and (tmp_path / "link").is_symlink()


def test_force_refuses_a_directory_that_is_not_a_workspace(tiny, tmp_path):
    src = tiny()
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for force in (["--force"], []):
        out = _refused(["convert", src, "-o", other, *force], f"--dst-path {other} is not a tpdeploy workspace (no manifest.json)")
        assert "--force replaces only workspaces; choose an empty or new directory" in out
        assert (other / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_force_refuses_a_foreign_manifest(tiny, tmp_path):
    src = tiny()
    other = tmp_path / "data"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    _refused(["convert", src, "-o", other, "--force"], "is not a tpdeploy workspace (its manifest.json")
    assert (other / "manifest.json").exists()


def test_force_replaces_a_workspace_and_an_empty_directory(tiny, tmp_path):
    src = tiny()
    assert run_cli("convert", src, "-o", tmp_path / "ws")[0] == 0
    (tmp_path / "ws" / "stray.txt").write_text("part of the old workspace")
    assert run_cli("convert", src, "-o", tmp_path / "ws", "--tp", "2", "--force")[0] == 0
    assert json.loads((tmp_path / "ws" / "manifest.json").read_text())["tp"] == 2
    assert not (tmp_path / "ws" / "stray.txt").exists()
    (tmp_path / "empty").mkdir()
    assert run_cli("convert", src, "-o", tmp_path / "empty", "--force")[0] == 0
    assert (tmp_path / "empty" / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["empty", "ws"]


def test_missing_tokenizer_is_found_before_writing(tiny, tmp_path, monkeypatch):
    """The source is validated whole: no rank is written, no temporary directory is made."""
    import converter.convert

    def must_not_run(*a, **kw):
        raise AssertionError("the conversion started writing before the source was validated")

    monkeypatch.setattr(converter.convert, "building", must_not_run)
    src = tiny()
    (src / "tokenizer.json").unlink()
    _refused(["convert", src, "-o", tmp_path / "ws"], "has neither tokenizer.json nor tokenizer.model", 3)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "tokenizer.json"])
def test_broken_tokenizer_files_are_found_before_writing(tiny, tmp_path, monkeypatch, name):
    import converter.convert

    monkeypatch.setattr(converter.convert, "building", lambda *a, **kw: pytest.fail("wrote before validating"))
    src = tiny()
    (src / name).write_text("{not json")
    _refused(["convert", src, "-o", tmp_path / "ws"], f"{name} is not valid JSON", 3)
    assert os.listdir(tmp_path) == []


def test_target_under_proc_is_not_writable(tiny):
    src = tiny()
    out = _refused(["convert", src, "-o", "/proc/tpdeploy-ws"], "is not writable")
    assert "disk space" not in out
    assert not Path("/proc/tpdeploy-ws").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 directory anyway")
def test_target_in_read_only_directory(tiny, tmp_path):
    src = tiny()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(["convert", src, "-o", ro / "ws"], f"{ro} is not writable")
    finally:
        ro.chmod(0o755)
