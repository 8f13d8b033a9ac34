"""Process-level guarantees on the real model: own shard only, the CLI, and bad input."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from formats.errors import FormatError, TpDeployError
from runtime.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _mapped_rank_dirs(pid: int) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return set(re.findall(r"/(rank\d+)/[^/\s]+\.safetensors", maps))


def test_each_rank_maps_only_its_own_shard(llms):
    llm = llms[3]
    assert _mapped_rank_dirs(__import__("os").getpid()) >= {"rank0"}
    assert "rank1" not in _mapped_rank_dirs(__import__("os").getpid())
    for rank, worker in enumerate(llm.driver.workers, start=1):
        assert _mapped_rank_dirs(worker.pid) == {f"rank{rank}"}


def test_rank_loads_with_other_ranks_deleted(smollm2_ws, tmp_path):
    """Opening never touches another rank's directory: rank 2 loads with rank0/ and rank1/ gone."""
    import torch

    from formats.manifest import load_manifest
    from runtime.worker.workspace import load_rank

    ws = tmp_path / "ws"
    shutil.copytree(smollm2_ws[3], ws)
    shutil.rmtree(ws / "rank0")
    shutil.rmtree(ws / "rank1")
    weights = load_rank(ws, load_manifest(ws), 2, torch.device("cpu"))
    assert weights["tok_embeddings.weight"].shape == (49152 // 3, 576)


def test_cli_generate_json_and_stream(smollm2_ws, llms):
    expected = llms[1].generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0]
    base = [sys.executable, "-m", "runtime", "generate", str(smollm2_ws[3]), "--prompt", "The capital of France is",
            "--max-tokens", "8", "--device", "cpu"]
    out = subprocess.run(base + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["text"] == expected.text and result["token_ids"] == expected.token_ids
    assert result["finish_reason"] == "length" and result["completion_tokens"] == 8
    streamed = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    assert streamed.stdout.rstrip("\n") == expected.text and "tokens/s" in streamed.stderr


def test_prompt_longer_than_context(smollm2_ws):
    from runtime.api import LLM

    with LLM(smollm2_ws[1], device="cpu", max_model_len=16) as llm:
        with pytest.raises(TpDeployError, match=r"has 2\d tokens but the context window \(max_model_len\) is 16"):
            llm.generate("word " * 20, SamplingParams(max_tokens=4))
        out = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
        assert out.outputs[0].finish_reason == "length" and out.num_prompt_tokens + len(out.outputs[0].token_ids) == 16


def test_missing_and_corrupt_manifest(smollm2_ws, tmp_path):
    from runtime.api import LLM

    with pytest.raises(FormatError, match="is not a workspace: manifest.json is missing"):
        LLM(tmp_path, device="cpu")
    ws = tmp_path / "ws"
    shutil.copytree(smollm2_ws[1], ws)
    (ws / "manifest.json").write_text('{"schema_version": 99')
    with pytest.raises(FormatError, match="manifest.json is not valid JSON"):
        LLM(ws, device="cpu")


def test_truncated_shard_named_by_the_rank_that_loads_it(smollm2_ws, tmp_path):
    """In its own process: one multi-rank LLM per process, and the session's is running."""
    ws = tmp_path / "ws"
    shutil.copytree(smollm2_ws[3], ws)
    with open(ws / "rank2" / "layer-00007.safetensors", "r+b") as f:
        f.truncate(1000)
    out = subprocess.run([sys.executable, "-m", "runtime", "generate", str(ws), "--prompt", "hi", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2, out.stderr
    assert re.search(r"tprun: error: rank 2 failed to load: .*rank2/layer-00007.safetensors has 1000 bytes", out.stderr)


def test_second_multi_rank_llm_in_one_process_is_refused(llms, smollm2_ws):
    from runtime.api import LLM

    with pytest.raises(TpDeployError, match="a multi-rank LLM is already running in this process"):
        LLM(smollm2_ws[3], device="cpu")


def test_more_ranks_than_gpus(smollm2_ws):
    import torch

    from runtime.api import LLM
    if torch.cuda.device_count() >= 3:
        pytest.skip("this machine has enough GPUs")
    with pytest.raises(TpDeployError, match=r"has 3 ranks \(tp x pp\) but \d CUDA device\(s\) are visible"):
        LLM(smollm2_ws[3], device="cuda")
