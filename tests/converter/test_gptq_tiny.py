"""Tiny GPTQ checkpoints: every rank's int4 parts dequantize bit for bit to the GPTQ format's own
dequantization (act-order reordering undone with the workspace's ``perm`` tensors and the w_down fold),
at tp 1, 2, 4; refusals; and the runtime against a torch model holding the dequantized weights."""
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from converter.cli import main
from converter.convert import ConvertOptions, convert
from converter.verify import verify
from formats import int4
from formats.manifest import load_manifest
from tests.converter.quant_parity import matches_dequantized
from tests.fixtures.gptq_pack import gptq_reference, make_tiny_gptq
from tests.workspace import bits_equal, source_state

SHAPES = {"num_layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256, "vocab": 264}
CASES = {  # id: make_tiny_gptq arguments
    "sym-v1": {"sym": True},
    "asym-v2": {"sym": False, "v2": True},
    "asym-v1-g64": {"sym": False, "group_size": 64},
    # per-channel: stored as repeated groups of 128, the largest supported group dividing every K
    "channel": {"group_size": -1, "sym": False, "quantize_config_file": True, "hidden": 256, "intermediate": 512},
    "act-order": {"desc_act": True, "sym": False, "wo_local": 4},
    "act-order-v2-sym": {"desc_act": True, "sym": True, "v2": True, "wo_local": 4},
}
TPS = {"asym-v1-g64": (1, 2), "channel": (1, 2)}  # tp 4 would cut a group of wo's 128 inputs
FOLD_FROM = {"gate_proj": "down_proj", "up_proj": "down_proj"}  # output columns take down's input order


def canonical_rows(g_idx: torch.Tensor) -> torch.Tensor:
    """docs/quantization.md's rule, written independently: groups ordered by their first row, rows in order within."""
    first = {}
    for k, g in enumerate(g_idx.tolist()):
        first.setdefault(g, k)
    return torch.tensor(sorted(range(len(g_idx)), key=lambda k: (first[int(g_idx[k])], k)))


def gptq_slices(ws: Path, src: Path):
    """(rank, source weight, workspace slice (out, in) as fp32, expected slice of the reference) pairs."""
    state = source_state(src)
    ref = gptq_reference(src)
    for rank in load_manifest(ws).ranks:
        files = {f.path: load_file(ws / f.path) for f in rank.files}
        for t in (t for t in rank.tensors if t.name.endswith(".qweight")):
            base = t.name.removesuffix(".qweight")
            parts = {p: files[t.file][f"{base}.{p}"] for p in int4.PARTS}
            w = int4.dequantize(parts["qweight"], parts["scales"], parts["zeros"], t.quant.group_size).float()
            perm = files[t.file].get(f"{base}.{int4.PERM}")
            for p in t.pieces:
                hf = p.source.removesuffix(".qweight")
                rows = _input_rows(state, hf, perm, p)
                if p.axis == 1:  # column-parallel: output columns [dst) hold canonical source outputs [src)
                    cols = torch.arange(*p.src)
                    leaf = hf.rsplit(".", 1)[1]
                    if leaf in FOLD_FROM and t.quant.act_order:
                        cols = canonical_rows(state[hf.replace(leaf, FOLD_FROM[leaf]) + ".g_idx"])[cols]
                    got = w[:, p.dst[0]:p.dst[1]].T
                else:  # row-parallel: this rank's K rows
                    cols, got = torch.arange(w.shape[1]), w.T
                yield rank.rank, hf, got.contiguous(), ref[hf + ".weight"][cols][:, rows].contiguous()


def _input_rows(state, hf: str, perm, p) -> torch.Tensor:
    """Source input feature of each of this rank's K rows."""
    if perm is not None:  # gathered at run time; rank-local, so offset by where the rank's rows start
        return perm.long() + (p.src[0] * int4.PACK if p.axis == 0 else 0)
    if p.axis == 1:
        return torch.arange(state[hf + ".g_idx"].numel())
    order = canonical_rows(state[hf + ".g_idx"])  # w_down: reordered, gathered by the fold
    return order[p.src[0] * int4.PACK:p.src[1] * int4.PACK]


@pytest.mark.parametrize("kind", list(CASES))
def test_gptq_shards_dequantize_exactly(tmp_path, kind):
    src = make_tiny_gptq(tmp_path / "src", arch="qwen2" if "v2" in kind else "llama", **{**SHAPES, **CASES[kind]})
    reference = gptq_reference(src)
    for tp in TPS.get(kind, (1, 2, 4)):
        ws = tmp_path / f"ws{tp}"
        convert(ConvertOptions(src, ws, tp))
        seen = set()
        for rank, source, got, want in gptq_slices(ws, src):
            assert bits_equal(got, want), f"tp={tp} rank={rank} {source}"
            seen.add(source + ".weight")
        assert seen == set(reference)
        assert verify(ws) == []


def test_manifest_records_gptq_act_order(tmp_path):
    src = make_tiny_gptq(tmp_path / "src", desc_act=True, wo_local=2, **SHAPES)
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    m = load_manifest(tmp_path / "ws")
    q = m.weights.quantization
    assert (q.source_format, q.act_order, q.zero_point, q.group_size) == ("gptq", True, False, 32)
    names = {t.name: t for t in m.ranks[1].tensors}
    assert names["layers.0.attention.wo.perm"].dtype == "int32" and names["layers.0.attention.wo.perm"].shape == (64,)
    assert "layers.0.feed_forward.w_gate_up.perm" in names and "layers.0.feed_forward.w_down.perm" not in names
    assert m.schema_version == 8
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "ws")])
    assert "quantized  tpdeploy-int4-v1 from gptq: group 32, float16 scales, symmetric, act-order" in shown.output


def test_numerics_check_the_act_order_gather(tmp_path):
    from converter.numerics import RTOL, verify_numerics
    src = make_tiny_gptq(tmp_path / "src", desc_act=True, sym=False, wo_local=2, **SHAPES)
    convert(ConvertOptions(src, tmp_path / "ws", 2))
    report = verify_numerics(tmp_path / "ws")
    assert report.problems == [] and report.worst < RTOL / 10


def _refused(tmp_path, src, pattern, *extra, code=3):
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws"), *extra])
    assert result.exit_code == code, result.output
    assert re.search(pattern, result.output), result.output
    assert not (tmp_path / "ws").exists()


def test_tp_cutting_an_act_order_group_is_refused_with_valid_values(tmp_path):
    src = make_tiny_gptq(tmp_path / "src", desc_act=True, wo_local=2, **SHAPES)
    _refused(tmp_path, src, r"--tp 4 would cut an act-order quantization group of layer 0's wo .*valid --tp values: "
                            r"1, 2$", "--tp", "4", code=2)


def test_pad_heads_is_refused_for_act_order(tmp_path):
    src = make_tiny_gptq(tmp_path / "src", desc_act=True, **{**SHAPES, "heads": 6, "hidden": 192})
    _refused(tmp_path, src, r"--pad-heads is not supported for act-order", "--tp", "4", "--pad-heads", code=2)


@pytest.mark.parametrize("edit,pattern", [
    ({"bits": 3}, r"3-bit weights are not supported; supported: 4 bits"),
    ({"bits": 2}, r"2-bit weights are not supported"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' is not supported .*supported: gptq, gptq_v2"),
    ({"dynamic": {r"+:.*\.18\..*": {"bits": 8}}}, r"'dynamic' per-module overrides .* not supported"),
    ({"group_size": 16}, r"group size 16 is not supported; supported: 32, 64, 128; or -1 \(per-channel\)"),
    ({"desc_act": False, "_g_idx": True}, r"g_idx is not in input order but desc_act is false"),
], ids=["bits3", "bits2", "marlin", "dynamic", "group16", "g_idx-without-desc_act"])
def test_gptq_refusals(tmp_path, edit, pattern):
    src = make_tiny_gptq(tmp_path / "src", desc_act=bool(edit.pop("_g_idx", False)), **SHAPES)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(edit)
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, src, pattern)


def test_fused_inputs_with_different_act_orders_are_refused(tmp_path):
    from safetensors.torch import save_file
    src = make_tiny_gptq(tmp_path / "src", desc_act=True, **SHAPES)
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _refused(tmp_path, src, r"k_proj.g_idx differs from .*q_proj.g_idx")


@pytest.mark.parametrize("kind", ["asym-v2", "act-order"])
def test_runtime_runs_tiny_gptq_like_its_dequantized_weights(tmp_path, kind):
    src = make_tiny_gptq(tmp_path / "src", arch="qwen2", **{**SHAPES, **CASES[kind]})
    state = {k: v.float() for k, v in source_state(src).items()
             if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    matches_dequantized(src, {**state, **gptq_reference(src)}, tmp_path)
