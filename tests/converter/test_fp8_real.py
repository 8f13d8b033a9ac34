"""SmolLM2 quantized to FP8 by llm-compressor itself (FP8_DYNAMIC: per-channel scales; FP8_BLOCK: 128 x 128
blocks, SmolLM2's 576- and 192-wide dims ending in partial blocks): every rank's weights dequantize bit for bit
to compressed-tensors' own dequantization at tp 1 and 3 (where a rank's share of o_proj, 192 columns, is not a
multiple of 128), and tprun computes what transformers computes with those weights (logits and greedy
tokens)."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from converter.convert import ConvertOptions, convert
from formats import fp8
from formats.manifest import load_manifest
from tests.converter.quant_parity import matches_dequantized
from tests.workspace import source_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["dynamic", "block"])
def checkpoint(request):
    from tests.fixtures.quantized import fp8_smollm2_path, reference_dequant

    src = fp8_smollm2_path(block=request.param == "block")
    return src, reference_dequant(src)


def _reassembled(ws: Path, ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each rank's FP8 weights dequantized by the workspace's own layout, put back where their pieces say."""
    m = load_manifest(ws)
    out: dict[str, torch.Tensor] = {}
    for rank in m.ranks:
        entries = {t.name: t for t in rank.tensors}
        for t in (t for t in rank.tensors if t.dtype == "float8_e4m3fn"):
            scale = entries[fp8.scale_name(t.name)]
            with safe_open(ws / t.file, "pt") as f, safe_open(ws / scale.file, "pt") as g:
                dq = fp8.dequantize(f.get_tensor(t.name), g.get_tensor(scale.name), m.weights.quantization.block_k)
            for p in t.pieces:
                full = out.setdefault(p.source, torch.full_like(ref[p.source], float("nan")))
                region = dq.narrow(p.axis, p.dst[0], p.dst[1] - p.dst[0])
                full.narrow(p.axis, p.src[0], p.src[1] - p.src[0]).copy_(region)
    return out


@pytest.mark.parametrize("tp", [1, 3])
def test_every_rank_dequantizes_to_the_tools_reference(checkpoint, tmp_path, tp):
    src, ref = checkpoint
    convert(ConvertOptions(src, tmp_path / "ws", tp))
    assert load_manifest(tmp_path / "ws").weights.quantization.source_format == "compressed-tensors"
    got = _reassembled(tmp_path / "ws", ref)
    assert sorted(got) == sorted(ref) and len(ref) == 30 * 7
    for name, expected in ref.items():
        assert torch.equal(got[name], expected), name  # NaN where no rank wrote: never equal


def test_tprun_matches_transformers_on_the_dequantized_model(checkpoint, tmp_path):
    src, ref = checkpoint
    dense = {k: v.float() for k, v in source_state(src).items()
             if v.dtype != torch.float8_e4m3fn and not k.endswith("_scale")}
    # All 27 positions of a 30-layer model with logits up to ~32, fp32 on both sides: 4.6e-5 measured at tp 1,
    # 9.4e-4 at tp 3 (three partial sums per row-parallel layer); the greedy tokens must be identical.
    matches_dequantized(src, {**dense, **ref}, tmp_path, tps=(1, 3), atol=2e-3)
