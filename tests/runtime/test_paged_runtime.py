"""The model over the paged cache on tiny random models: chunked prefill, a cache too small for
the whole batch, every KV precision, and the Triton kernels (interpreted on CPU) through the model."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from formats.errors import TpDeployError
from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.engine.sampling import SamplingParams

LOGIT_ATOL = 1e-4  # fp32 throughout; only the order of sums differs between paths
# Quantized KV perturbs every attention score; on random tiny models logits of magnitude ~1 move by:
KV_ATOL = {"int8": 0.02, "int4": 0.5}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [list(range(3, 3 + n)) for n in (1, 5, 17, 40)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("paged")
    src = make_tiny(root / "src", "llama", heads=4, kv_heads=2, vocab=301, seed=3)
    return {tp: convert(ConvertOptions(src, root / f"tp{tp}", tp)) and root / f"tp{tp}" for tp in (1, 2)}


# Triton kernels run compiled on a GPU and in Triton's interpreter on CPU (tests/conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _llm(path, max_prefill_tokens: int = 2048, device: str = "cpu", **cache) -> LLM:
    return LLM(path, device=device, cache=CacheConfig(block_size=16, **cache), max_prefill_tokens=max_prefill_tokens)


def _per_kernels(names: tuple[str, str], path, prompts: list, params: SamplingParams, monkeypatch,
                 **llm) -> dict:
    """Per kernel set: the chunked-prefill logits of one prompt, and greedy tokens of a batch."""
    results = {}
    for name in names:
        monkeypatch.setenv("TPDEPLOY_KERNELS", name)
        with _llm(path, **llm) as model:
            assert model.driver.runner.kernels.name == name
            results[name] = (model.prompt_logits(PROMPTS[3], chunk=13),
                             [o.outputs[0].token_ids for o in model.generate(prompts, params)])
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_chunked_prefill_gives_the_same_logits(ws, tp):
    prompt = list(range(5, 58))  # 53 tokens: chunks of 7 straddle the 16-token blocks
    with _llm(ws[tp], kv_cache_tokens=256) as llm:
        whole = llm.prompt_logits(prompt)
        chunked = llm.prompt_logits(prompt, chunk=7)
        assert llm.blocks.num_free == llm.blocks.num_blocks
    torch.testing.assert_close(chunked, whole, atol=LOGIT_ATOL, rtol=0)


def test_prompt_chunks_beside_decodes_give_the_same_tokens(ws):
    with _llm(ws[2], kv_cache_tokens=1024) as whole:
        expected = [o.outputs[0].token_ids for o in whole.generate(PROMPTS, GREEDY)]
    with _llm(ws[2], kv_cache_tokens=1024, max_prefill_tokens=6) as chunked:
        assert [o.outputs[0].token_ids for o in chunked.generate(PROMPTS, GREEDY)] == expected


def test_a_small_cache_queues_sequences_and_gives_the_same_answers(ws):
    with _llm(ws[1], kv_cache_tokens=4096) as big:
        expected = [o.outputs[0].token_ids for o in big.generate(PROMPTS * 3, GREEDY)]
    with _llm(ws[1], kv_cache_tokens=64) as small:  # 4 blocks: one or two sequences at a time
        got = [o.outputs[0].token_ids for o in small.generate(PROMPTS * 3, GREEDY)]
        assert small.blocks.num_free == small.blocks.num_blocks == 4
    assert got == expected


def test_a_sequence_larger_than_the_cache_is_refused_clearly_and_nothing_leaks(ws):
    with _llm(ws[1], kv_cache_tokens=32) as llm:
        with pytest.raises(TpDeployError, match="needs 50 tokens of KV cache, but the cache holds 32"):
            llm.generate([PROMPTS[0], PROMPTS[3]], GREEDY)
        assert llm.blocks.num_free == 2
        assert len(llm.generate(PROMPTS[1], GREEDY)[0].outputs[0].token_ids) == 10  # still serves


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantized_kv_stays_close_to_fp32(ws, kv):
    prompt = PROMPTS[3]
    with _llm(ws[2], kv_cache_tokens=256) as llm:
        ref = llm.prompt_logits(prompt, chunk=9)
    with _llm(ws[2], kv_cache_tokens=256, kv_dtype=kv) as llm:
        assert llm.driver.runner.cache.k.dtype == torch.uint8
        got = llm.prompt_logits(prompt, chunk=9)
    torch.testing.assert_close(got, ref, atol=KV_ATOL[kv], rtol=0)
    assert not torch.equal(got, ref)  # the cache really is quantized


@pytest.mark.parametrize("kv", ["auto", "int4"])
def test_triton_kernels_through_the_model_match_the_torch_path(ws, kv, monkeypatch):
    """Prefill, chunked prefill and batched decode through the Triton kernels (interpreted on CPU)."""
    pytest.importorskip("triton")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    # 16 new tokens per step: the 40-token prompt is prefilled in chunks beside the other's decodes
    results = _per_kernels(("torch", "triton"), ws[1], [PROMPTS[1], PROMPTS[3]], params, monkeypatch,
                           kv_cache_tokens=256, kv_dtype=kv, max_prefill_tokens=16, device=TRITON_DEVICE)
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=LOGIT_ATOL, rtol=0)
    assert results["triton"][1] == results["torch"][1]


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_batched_cpu_attention_through_the_model_matches_the_reference(ws, kv, monkeypatch):
    """The CPU path (all sequences of a step in one attention call) against the per-sequence reference:
    chunked prefill beside decodes, then batched decode, on 2 ranks."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = _per_kernels(("reference", "torch"), ws[2], PROMPTS * 2, params, monkeypatch,
                           kv_cache_tokens=1024, kv_dtype=kv, max_prefill_tokens=24)
    torch.testing.assert_close(results["torch"][0], results["reference"][0], atol=LOGIT_ATOL, rtol=0)
    assert results["torch"][1] == results["reference"][1]


def test_w4a16_kernel_through_the_model_matches_the_torch_path(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from tests.fixtures.int4_pack import make_tiny_awq

    src = make_tiny_awq(tmp_path / "awq", group_size=32, dtype=torch.float16, vocab=301, seed=5)
    convert(ConvertOptions(src, tmp_path / "ws", 1))
    logits = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("TPDEPLOY_KERNELS", name)
        with LLM(tmp_path / "ws", device=TRITON_DEVICE, dtype="float32", kv_cache_tokens=128) as llm:
            logits[name] = llm.prompt_logits(PROMPTS[2])
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=LOGIT_ATOL, rtol=0)


def test_bad_kernel_choice_is_named(ws, monkeypatch):
    monkeypatch.setenv("TPDEPLOY_KERNELS", "cuda-graphs")
    with pytest.raises(TpDeployError, match="TPDEPLOY_KERNELS='cuda-graphs' is not known"):
        _llm(ws[1], kv_cache_tokens=64)
