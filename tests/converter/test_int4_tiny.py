"""Tiny AWQ and compressed-tensors checkpoints: exact int4 sharding at tp 1, 2, 4, and every refusal."""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats.manifest import load_manifest
from tests.fixtures.int4_pack import make_tiny_awq, make_tiny_ct, tiny_reference
from tests.workspace import bits_equal, int4_slices

SHAPES = dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=264)
FORMATS = {
    "awq": lambda d, **kw: make_tiny_awq(d, **kw),
    "ct-asym": lambda d, **kw: make_tiny_ct(d, symmetric=False, **kw),
    "ct-sym": lambda d, **kw: make_tiny_ct(d, symmetric=True, **kw),
}


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("qwen2", 1)], ids=["llama-kv2", "qwen2-kv1"])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_int4_shards_dequantize_exactly(tmp_path, kind, arch, kv):
    src = FORMATS[kind](tmp_path / "src", arch=arch, **{**SHAPES, "kv_heads": kv})
    reference = _as_the_tools_compute(src)
    for tp in (1, 2, 4):  # kv 1 and 2 < 4: replicated KV heads
        ws = tmp_path / f"ws{tp}"
        convert(ConvertOptions(src, ws, tp))
        seen = set()
        for rank, source, got, (axis, (a, b)) in int4_slices(ws):
            assert bits_equal(got.contiguous(), reference[source].float().narrow(axis, a, b - a).contiguous()), \
                f"tp={tp} rank={rank} {source}"
            seen.add(source)
        assert seen == set(reference)
        assert verify(ws) == []


def _as_the_tools_compute(src) -> dict[str, torch.Tensor]:
    """The exact products (q - z) * s rounded once to the scales' dtype (fp16 here), as the tools do."""
    return {k: v.to(torch.float16).float() for k, v in tiny_reference(src).items()}


def test_manifest_records_int4_per_tensor(tmp_path):
    src = make_tiny_ct(tmp_path / "src", symmetric=True, **SHAPES)
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    m = load_manifest(tmp_path / "ws")
    q = m.weights.quantization
    assert (q.group_size, q.zero_point, q.source_format, q.layout) == (32, False, "compressed-tensors", "tpdeploy-int4-v1")
    by_name = {t.name: t for t in m.ranks[1].tensors}
    assert by_name["layers.0.attention.wo.qweight"].dtype == "int32" and by_name["layers.0.attention.wo.qweight"].quant == q
    assert by_name["layers.0.attention.wo.zeros"].dtype == "uint8"
    assert by_name["layers.0.attention_norm.weight"].quant is None


def _edit_config(src, **quant):
    cfg = json.loads((src / "config.json").read_text())
    qc = cfg["quantization_config"]
    for key, value in quant.items():
        target = qc["config_groups"]["group_0"]["weights"] if key in ("num_bits", "actorder", "strategy") else qc
        target[key] = value
    (src / "config.json").write_text(json.dumps(cfg))


def _refused(tmp_path, src, pattern, *extra, code=3):
    """Refused with ``code``: 3 for a checkpoint tpconv cannot read, 2 for flags that do not fit it."""
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws"), *extra])
    assert result.exit_code == code, result.output
    assert re.search(pattern, result.output), result.output
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("edit,pattern", [
    ({"bits": 8}, r"8-bit weights are not supported; supported: 4 bits"),
    ({"version": "gemv"}, r"AWQ version 'gemv' is not supported .*supported: gemm"),
    ({"zero_point": False}, r"zero_point=false is not supported"),
    ({"group_size": 16}, r"group size 16 is not supported; supported: 32, 64, 128"),
    ({"quant_method": "hqq"}, r"quant_method='hqq' is not supported; supported: awq, compressed-tensors, gptq"),
], ids=["bits", "gemv", "no-zero-point", "group16", "hqq"])
def test_awq_refusals(tmp_path, edit, pattern):
    src = make_tiny_awq(tmp_path / "src", **SHAPES)
    _edit_config(src, **edit)
    _refused(tmp_path, src, pattern)


@pytest.mark.parametrize("edit,pattern", [
    ({"num_bits": 8}, r"8-bit weights are not supported"),
    ({"actorder": "group"}, r"actorder='group' .* is not supported"),
    ({"strategy": "channel"}, r"strategy 'channel' is not supported; supported: group"),
    ({"format": "marlin-24"}, r"format 'marlin-24' is not supported; supported: pack-quantized"),
], ids=["bits", "actorder", "channel", "marlin"])
def test_compressed_tensors_refusals(tmp_path, edit, pattern):
    src = make_tiny_ct(tmp_path / "src", **SHAPES)
    if "format" in edit:
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"]["format"] = cfg["quantization_config"]["config_groups"]["group_0"]["format"] = edit["format"]
        (src / "config.json").write_text(json.dumps(cfg))
    else:
        _edit_config(src, **edit)
    _refused(tmp_path, src, pattern)


def test_model_format_awq_refuses_compressed_tensors(tmp_path):
    src = make_tiny_ct(tmp_path / "src", **SHAPES)
    _refused(tmp_path, src, r"--model-format awq needs an AWQ checkpoint, found quant_method='compressed-tensors'",
             "--model-format", "awq", code=2)


def test_tp_off_group_boundary_is_refused_with_valid_values(tmp_path):
    src = make_tiny_awq(tmp_path / "src", group_size=64, **{**SHAPES, "intermediate": 192})
    _refused(tmp_path, src, r"--tp 2 gives each rank 96 of the 192 input features of w_down \(down_proj\), not a "
                            r"multiple of the quantization group size 64 .*; valid --tp values: 1$", "--tp", "2", code=2)


def test_runtime_runs_tiny_int4_like_its_dequantized_weights(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.api import LLM
    src = make_tiny_awq(tmp_path / "src", arch="qwen2", **SHAPES)
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).float().eval()
    from tests.workspace import source_state
    state = {k: v.float() for k, v in source_state(src).items() if not k.endswith(("qweight", "qzeros", "scales"))}
    state.update(_as_the_tools_compute(src))
    hf.load_state_dict(state, strict=False)
    prompt = list(range(3, 30))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    for tp in (1, 2):
        convert(ConvertOptions(src, tmp_path / f"ws{tp}", tp))
        with LLM(tmp_path / f"ws{tp}", device="cpu", dtype="float32") as llm:
            torch.testing.assert_close(llm.prompt_logits(prompt), ref, atol=1e-4, rtol=0)
