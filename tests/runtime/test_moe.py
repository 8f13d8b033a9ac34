"""Mixture-of-experts models through tprun: Qwen3-MoE (top-k renormalised or not, a dense layer between MoE
layers) and Mixtral, tiny random checkpoints saved by transformers. Logits within LOGIT_ATOL and greedy tokens
identical to transformers at tp 1, tp 2 (every expert sliced) and ep 2 (whole experts per rank); an expert no
token routes to changes nothing."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from tests.converter.test_moe import KW, MIXTRAL, QWEN3_MOE
from tests.runtime.parity import check_parity, random_prompt, reference

VOCAB = KW["vocab"]


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("qwen3moe")
    src = make_tiny(root / "src", "qwen3_moe", num_layers=3, seed=4, extra_config=QWEN3_MOE, **KW)
    return root, reference(src, random_prompt(19, 3, VOCAB))


@pytest.mark.parametrize("tp,ep", [(1, False), (2, False), (2, True)])
def test_qwen3_moe_logits_and_greedy_match_transformers(qwen3_moe, tp, ep):
    root, ref = qwen3_moe
    check_parity(ref, root / f"tp{tp}{ep}", tp, ep=ep, chunk=6)


@pytest.mark.parametrize("tp,ep,fused", [(2, True, False), (2, False, True)])
def test_mixtral_and_fused_experts_match_transformers(tiny, tmp_path, tp, ep, fused):
    """Mixtral (every layer MoE, weights always renormalised); Qwen3-MoE saved with fused 3-D experts and
    norm_topk_prob off."""
    if fused:
        src = tiny("qwen3_moe", num_layers=2, seed=6, fused_experts=True,
                   extra_config={**QWEN3_MOE, "norm_topk_prob": False, "mlp_only_layers": []}, **KW)
    else:
        src = tiny("mixtral", num_layers=2, seed=6, extra_config=MIXTRAL, **KW)
    check_parity(reference(src, random_prompt(15, 8, VOCAB)), tmp_path / "ws", tp, ep=ep)


def test_an_expert_no_token_routes_to_changes_nothing(tiny, tmp_path):
    """Garbage in the weights of experts the prompt never picks, in every layer, leaves the logits bit for bit."""
    src = tiny("qwen3_moe", num_layers=2, seed=11, extra_config={**QWEN3_MOE, "mlp_only_layers": []}, **KW)
    prompt = random_prompt(5, 1, VOCAB)
    hf = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        routers = hf(torch.tensor([prompt]), output_router_logits=True).router_logits
    unused = [sorted(set(range(8)) - set(r.topk(2, dim=-1).indices.flatten().tolist())) for r in routers]
    assert all(unused), unused
    convert(ConvertOptions(src, tmp_path / "before", 2, ep=True))
    tensors = load_file(src / "model.safetensors")
    for layer, experts in enumerate(unused):
        for e in experts:
            for w in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{e}.{w}.weight"
                tensors[name] = torch.full_like(tensors[name], 1e4)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    convert(ConvertOptions(src, tmp_path / "after", 2, ep=True))
    logits = []
    for ws in ("before", "after"):
        with LLM(tmp_path / ws, device="cpu") as llm:
            logits.append(llm.prompt_logits(prompt))
    assert torch.equal(logits[0], logits[1])
