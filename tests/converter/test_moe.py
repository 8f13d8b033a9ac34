"""Mixture-of-experts checkpoints (Qwen3-MoE, Mixtral) into workspaces: every expert's weights reassemble bit
for bit from the shards at tp 1/2/4 (a slice of every expert per rank) and ep 2/4 (whole experts per rank),
from per-expert and fused 3-D checkpoints; memory stays balanced; bad configs are refused by field."""
import json
import re

import pytest
from click.testing import CliRunner

from converter.cli import main
from converter.convert import ConvertOptions, convert
from converter.verify import inspect, verify
from formats.errors import FormatError, TpDeployError
from formats.manifest import load_manifest
from tests.workspace import bits_equal, reassemble, source_state

KW = {"heads": 4, "kv_heads": 2, "hidden": 64, "head_dim": 16, "vocab": 160, "intermediate": 96}
QWEN3_MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
             "mlp_only_layers": [1], "decoder_sparse_step": 1}
MIXTRAL = {"num_local_experts": 4, "num_experts_per_tok": 2}


def moe_source(tiny, arch: str = "qwen3_moe", extra: dict | None = None, **kw):
    extra = {**(QWEN3_MOE if arch == "qwen3_moe" else MIXTRAL), **(extra or {})}
    return tiny(arch, num_layers=3, extra_config=extra, **{**KW, **kw})


def expected_tensors(src) -> dict:
    """The source's tensors, fused 3-D experts cut per expert as the manifest names them (``NAME@e:part``)."""
    out = {}
    for name, t in source_state(src).items():
        if name.endswith("experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{name}@{e}:0"], out[f"{name}@{e}:1"] = t[e, :inter], t[e, inter:]
        elif name.endswith("experts.down_proj"):
            out.update({f"{name}@{e}": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


def check_reassembles(src, ws, tp: int, ep: bool = False) -> None:
    convert(ConvertOptions(src, ws, tp, ep=ep))
    expected, got = expected_tensors(src), reassemble(ws)
    assert set(got) == set(expected)
    assert all(bits_equal(t, expected[n]) for n, t in got.items())
    assert verify(ws) == []


@pytest.mark.parametrize("style,fused,fmt", [("v5", False, "safetensors"), ("v4", False, "safetensors"),
                                             ("v5", True, "safetensors"), ("v4", True, "bin")])
def test_qwen3_moe_reassembles_at_tp_and_ep(tiny, tmp_path, style, fused, fmt):
    """Per-expert or fused 3-D experts (a .bin holds the state dict as transformers 5 keeps it: fused)."""
    src = moe_source(tiny, style=style, fused_experts=fused and fmt == "safetensors", fmt=fmt)
    for tp, ep in ((1, False), (2, False), (4, False), (2, True), (4, True)):
        check_reassembles(src, tmp_path / f"tp{tp}{'ep' if ep else ''}", tp, ep)
    m = load_manifest(tmp_path / "tp4ep")
    assert m.model.moe.layers == (0, 2) and m.model.moe.expert_parallel and m.model.moe.norm_topk_prob
    assert m.schema_version == 8
    names = {t.name for t in m.ranks[1].tensors}
    assert "layers.1.feed_forward.w_gate_up.weight" in names and "layers.0.feed_forward.router.weight" in names
    assert "layers.0.feed_forward.w_gate_up.weight" not in names  # the MoE layer has experts instead
    gate_up = next(t for t in m.ranks[1].tensors if t.name == "layers.0.feed_forward.experts.w_gate_up.weight")
    assert gate_up.shape == (2 * 2 * 32, 64)  # 2 whole experts, [gate; up] each
    held = {next(g for g in re.search(r"experts\.(\d+)\.|@(\d+)", p.source).groups() if g) for p in gate_up.pieces}
    assert held == {"2", "3"}  # rank 1: experts 2 and 3


def test_mixtral_reassembles_at_tp_and_ep(tiny, tmp_path):
    src = moe_source(tiny, "mixtral")
    for tp, ep in ((2, False), (2, True), (4, True)):
        check_reassembles(src, tmp_path / f"tp{tp}{ep}", tp, ep)
    moe = load_manifest(tmp_path / "tp2True").model.moe
    assert moe.layers == (0, 1, 2) and moe.norm_topk_prob and moe.intermediate_size == 96


@pytest.mark.parametrize("ep", [False, True])
def test_moe_memory_is_balanced_and_inspect_shows_the_experts(tiny, tmp_path, ep):
    src = moe_source(tiny)
    convert(ConvertOptions(src, tmp_path / "ws", 4, ep=ep))
    info = inspect(tmp_path / "ws")
    assert info["rank_spread_percent"] < 1.0
    experts = info["experts"]
    assert experts["mode"] == ("expert parallel" if ep else "tensor parallel")
    assert [r["experts"] for r in experts["per_rank"]] == ([[0, 2], [2, 4], [4, 6], [6, 8]] if ep else [[0, 8]] * 4)
    assert len({r["expert_bytes"] for r in experts["per_rank"]}) == 1
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "ws")])
    assert out.exit_code == 0 and ("experts 2..3 whole" if ep else "a slice of experts 0..7") in out.stdout


def test_tp_that_divides_neither_experts_nor_intermediate_is_refused_with_valid_values(tiny, tmp_path):
    src = moe_source(tiny, extra={"num_experts": 6, "moe_intermediate_size": 18})  # tp 4 divides neither
    with pytest.raises(TpDeployError, match=r"expert intermediate size 18 .*valid --tp values: 1, 2$"):
        convert(ConvertOptions(src, tmp_path / "a", 4))
    with pytest.raises(TpDeployError, match=r"--tp 4 with --ep does not divide the 6 experts.*values: 1, 2$"):
        convert(ConvertOptions(src, tmp_path / "b", 4, ep=True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_bad_moe_configs_are_refused_naming_the_field(tiny, tmp_path):
    src = moe_source(tiny)
    _edit_config(src, num_experts_per_tok=9)
    with pytest.raises(FormatError, match="field 'num_experts_per_tok' is 9, more than the 8 experts"):
        convert(ConvertOptions(src, tmp_path / "a", 1))
    _edit_config(src, num_experts_per_tok=2, mlp_only_layers=[5])
    with pytest.raises(FormatError, match="'mlp_only_layers' names layers \\[5\\]"):
        convert(ConvertOptions(src, tmp_path / "b", 1))
    _edit_config(src, mlp_only_layers=[1], architectures=["Qwen2MoeForCausalLM"])
    with pytest.raises(FormatError, match="shared expert"):
        convert(ConvertOptions(src, tmp_path / "c", 1))


def test_missing_router_is_refused_by_name(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    src = moe_source(tiny)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.gate.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "ws")])
    assert result.exit_code == 3 and "'model.layers.2.mlp.gate.weight' is missing" in result.output


def test_ep_on_a_dense_model_is_a_flag_error(tiny, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(tiny("llama")), "-o", str(tmp_path / "ws"), "--ep"])
    assert result.exit_code == 2 and "--ep shards the experts" in result.output


@pytest.mark.parametrize("tp,ep", [(2, False), (4, True)])
def test_numerics_check_routes_tokens_through_every_ranks_experts(tiny, tmp_path, tp, ep):
    from safetensors.torch import load_file, save_file

    from converter.numerics import verify_numerics

    src = moe_source(tiny)
    convert(ConvertOptions(src, tmp_path / "ws", tp, ep=ep))
    report = verify_numerics(tmp_path / "ws")
    assert report.problems == [] and report.worst < 1e-5
    tensors = load_file(src / "model.safetensors")  # another expert 5 in the last layer: caught, by name
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    tensors[name] = tensors[name].flip(0)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    problems = verify_numerics(tmp_path / "ws").problems
    assert any("layers.2.expert 5" in p for p in problems), problems
