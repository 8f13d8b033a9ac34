"""Tiny FP8 checkpoints (compressed-tensors per-tensor / per-channel / block, and block FP8): every rank's
weights are the source's FP8 bytes, its scales the source's repeated onto ``formats.fp8``'s (N, K/B) cells,
including shards of K that are not multiples of 128 (K 384 at tp 4: 96 per rank); refusals; the memory
plan; and the runtime against a transformers model holding the dequantized weights."""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from converter.convert import ConvertOptions, convert
from converter.numerics import RTOL, verify_numerics
from converter.verify import verify
from formats import fp8
from formats.errors import FormatError
from formats.manifest import load_manifest
from runtime.worker.memory import weights_bytes
from tests.converter.quant_parity import matches_dequantized
from tests.fixtures.fp8_pack import expand, fp8_reference, make_tiny_fp8
from tests.workspace import bits_equal, reassemble, source_state

# K 384 (3 blocks of 128) everywhere; wo and w_down split it into 192 (tp 2) and 96 (tp 4) per rank, and
# k/v have N 192, so the last source block of their rows is partial.
SHAPES = {"num_layers": 2, "hidden": 384, "heads": 4, "kv_heads": 2, "intermediate": 384, "vocab": 264}
CASES = {  # id: make_tiny_fp8 arguments
    "ct-tensor-static": {"scheme": "tensor", "activations": "static"},
    "ct-channel-bf16": {"scheme": "channel", "scale_dtype": torch.bfloat16},
    "ct-block": {"scheme": "ct-block"},
    "block": {"scheme": "block"},
}
BLOCKS = {"block": {1: 128, 2: 64, 4: 32}, "ct-tensor-static": {1: 384, 2: 192, 4: 96}}  # B by tp


def _strategy(kind: str) -> str:
    return "block" if "block" in kind else kind.split("-")[1]


@pytest.mark.parametrize("kind", list(CASES))
def test_fp8_shards_reassemble_bit_for_bit(tmp_path, kind):
    src = make_tiny_fp8(tmp_path / "src", **{**SHAPES, **CASES[kind]})
    state = source_state(src)
    weights = {n: t for n, t in state.items() if t.dtype == torch.float8_e4m3fn}
    for tp in (1, 2, 4):
        ws = tmp_path / f"ws{tp}"
        convert(ConvertOptions(src, ws, tp))
        q = load_manifest(ws).weights.quantization
        assert (q.layout, q.strategy) == (fp8.LAYOUT, _strategy(kind))
        assert q.block_k == BLOCKS.get(kind, {}).get(tp, q.block_k)
        back = reassemble(ws)
        for name, w in weights.items():
            assert bits_equal(back[name], w), f"tp={tp} {name}"
            scale = next(s for s in state if s.startswith(name.removesuffix("weight")) and "weight_scale" in s)
            n, k = w.shape
            cells = expand(state[scale].float(), _strategy(kind), n, k)[:, ::q.block_k]  # each cell's first column
            assert bits_equal(back[scale], torch.empty(cells.shape).copy_(cells)), f"tp={tp} {scale}"
        for name in set(state) - set(weights) - {s for s in state if "scale" in s}:
            assert bits_equal(back[name], state[name]), f"tp={tp} {name}"
        assert verify(ws) == []
    report = verify_numerics(tmp_path / "ws4")
    assert report.problems == [] and report.worst < RTOL / 10


def test_manifest_inspect_and_plan_of_an_fp8_workspace(tmp_path):
    src = make_tiny_fp8(tmp_path / "src", scheme="block", **SHAPES)
    ws = tmp_path / "ws"
    convert(ConvertOptions(src, ws, 4))
    m = load_manifest(ws)
    assert m.schema_version == 8
    t = {t.name: t for t in m.ranks[3].tensors}
    assert (t["layers.0.attention.wo.weight"].dtype, t["layers.0.attention.wo.weight"].shape) == ("float8_e4m3fn",
                                                                                                  (384, 96))
    assert (t["layers.0.attention.wo.weight_scale"].dtype, t["layers.0.attention.wo.weight_scale"].shape) == (
        "float32", (384, 3))
    assert t["layers.0.attention.wo.weight"].quant == m.weights.quantization and t["norm.weight"].quant is None
    shown = CliRunner().invoke(main, ["inspect", str(ws)])
    assert ("quantized  tpdeploy-fp8-v1 from fp8-block: float8_e4m3fn weights, block 128x128 scales as float32 per "
            "row and 32 input columns, activation scales dynamic (unused: W8A16)") in shown.output, shown.output
    # tprun plan: FP8 weights count one byte, scales four, dense tensors the compute dtype; dense on CPU.
    fp8_bytes = sum(x.shape[0] * x.shape[1] * (4 if fp8.is_scale(x.name) else 1) for x in m.ranks[0].tensors
                    if x.quant is not None)
    dense = sum(torch.Size(x.shape).numel() for x in m.ranks[0].tensors if x.quant is None)
    assert weights_bytes(m, 0, torch.bfloat16) == fp8_bytes + 2 * dense
    linears = sum(torch.Size(x.shape).numel() for x in m.ranks[0].tensors if x.dtype == "float8_e4m3fn")
    assert weights_bytes(m, 0, torch.float32, int4_dense=True) == 4 * (linears + dense)
    # A schema-6 manifest cannot hold FP8 (an older reader would not know the layout).
    data = json.loads((ws / "manifest.json").read_text())
    (ws / "manifest.json").write_text(json.dumps({**data, "schema_version": 6}))
    with pytest.raises(FormatError, match=r"layout 'tpdeploy-fp8-v1' is unknown for schema_version 6"):
        load_manifest(ws)


def _refused(tmp_path, src, pattern, *extra, code=3):
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws"), *extra])
    assert result.exit_code == code, result.output
    assert re.search(pattern, result.output), result.output
    assert not (tmp_path / "ws").exists()


def test_tp_not_dividing_the_model_is_refused_with_valid_values(tmp_path):
    src = make_tiny_fp8(tmp_path / "src", scheme="block", **SHAPES)
    _refused(tmp_path, src, r"--tp 3 does not divide the 4 attention heads.*valid --tp values: 1, 2, 4", "--tp", "3",
             code=2)


def _edit_group(qc, **weights):
    qc["config_groups"]["group_0"]["weights"].update(weights)


@pytest.mark.parametrize("scheme,edit,pattern", [
    ("block", lambda qc: qc.update(weight_block_size=[64, 64]), r"weight_block_size \[64, 64\] is not supported; "
                                                                r"supported: \[128, 128\]"),
    ("block", lambda qc: qc.pop("weight_block_size"), r"quant_method fp8 without weight_block_size"),
    ("channel", lambda qc: _edit_group(qc, strategy="group", group_size=128), r"strategy 'group' is not supported"),
    ("channel", lambda qc: _edit_group(qc, dynamic=True), r"float-quantized weights .* are not supported"),
], ids=["block64", "no-block", "ct-group", "ct-dynamic-weights"])
def test_fp8_refusals(tmp_path, scheme, edit, pattern):
    src = make_tiny_fp8(tmp_path / "src", scheme=scheme, **SHAPES)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg["quantization_config"])
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, src, pattern)


@pytest.mark.parametrize("kind", ["ct-tensor-static", "block"])
def test_runtime_runs_tiny_fp8_like_its_dequantized_weights(tmp_path, kind):
    src = make_tiny_fp8(tmp_path / "src", arch="qwen2", **{**SHAPES, **CASES[kind]})
    state = {k: v.float() for k, v in source_state(src).items()
             if v.dtype != torch.float8_e4m3fn and "_scale" not in k}
    matches_dequantized(src, {**state, **fp8_reference(src)}, tmp_path)
