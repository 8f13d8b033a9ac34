"""tp x pp on tiny random models: each stage runs its layers on its own processes, hidden states go
stage to stage, logits come back to rank 0; logits and greedy tokens match transformers."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.engine.sampling import SamplingParams

LOGIT_ATOL = 1e-4  # fp32; tp > 1 sums partial matmuls in another order than one matmul
LAYERS = 5


@pytest.fixture(scope="module")
def tiny_pp(tmp_path_factory):
    from tests.fixtures.tiny import make_tiny

    root = tmp_path_factory.mktemp("pp")
    src = make_tiny(root / "src", "qwen2", num_layers=LAYERS, heads=4, kv_heads=2, tie=True, vocab=301, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prompts = [torch.randint(3, 301, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (19, 7, 30)]
    with torch.no_grad():
        logits = hf(torch.tensor([prompts[0]])).logits[0]
        greedy = [hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return src, root, prompts, logits, greedy


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (1, 3), (2, 3)])
def test_logits_and_greedy_match_transformers(tiny_pp, tp, pp):
    src, root, prompts, ref_logits, ref_greedy = tiny_pp
    ws = root / f"tp{tp}pp{pp}"
    convert(ConvertOptions(src, ws, tp, pp=pp))
    with LLM(ws, device="cpu") as llm:
        assert llm.engine.depth == pp and len(llm.driver.workers) == tp * pp - 1
        torch.testing.assert_close(llm.prompt_logits(prompts[0]), ref_logits, atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(llm.prompt_logits(prompts[0], chunk=8), ref_logits, atol=LOGIT_ATOL, rtol=0)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref_greedy


def test_batches_in_flight_give_the_same_tokens_as_one_at_a_time(tiny_pp):
    src, root, prompts, _, ref_greedy = tiny_pp
    ws = root / "pp2"
    convert(ConvertOptions(src, ws, 1, pp=2))
    many = prompts * 4  # 12 sequences, split over the two batches in flight
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = {}
    for depth in (1, 2):
        with LLM(ws, device="cpu", pipeline_batches=depth) as llm:
            submitted = _count_submits(llm.driver)
            results[depth] = [o.outputs[0].token_ids for o in llm.generate(many, params)]
            assert llm.engine.depth == depth and max(submitted) <= (12 if depth == 1 else 6)
            assert llm.blocks.num_used == 0
    assert results[1] == results[2] == ref_greedy * 4


def _count_submits(driver) -> list[int]:
    """Record the sequence count of every step the engine submits."""
    sizes, real = [], driver.submit

    def submit(step):
        sizes.append(len(step.batch.seqs))
        return real(step)

    driver.submit = submit
    return sizes


def test_idle_ranks_outlive_the_dist_timeout(tiny, tmp_path):
    """Keepalive steps: ranks idle for longer than --dist-timeout still answer (gloo ops would time out)."""
    src = tiny("llama", num_layers=2)
    convert(ConvertOptions(src, tmp_path / "ws", 2, pp=2))
    with LLM(tmp_path / "ws", device="cpu", dist_timeout=3.0) as llm:
        first = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
        time.sleep(8)
        again = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=4))[0].outputs[0].token_ids
    assert first == again and len(first) == 4


def test_loopback_rendezvous_with_several_nodes_is_warned_about(monkeypatch):
    from runtime.worker.parallel import Rendezvous, loopback_warning

    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert "loopback address but torchrun runs 2 nodes" in loopback_warning(Rendezvous("127.0.0.1", 29500, False))
    assert loopback_warning(Rendezvous("10.0.0.1", 29500, False)) is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert loopback_warning(Rendezvous("127.0.0.1", 29500, False)) is None


def test_close_with_steps_in_flight_stops_every_rank(tiny_pp):
    """A run left with steps in flight (the caller stopped reading): close takes their logits and every
    rank exits 0."""
    src, root, prompts, _, _ = tiny_pp
    ws = root / "pp2-close"
    convert(ConvertOptions(src, ws, 1, pp=2))
    llm = LLM(ws, device="cpu")
    for i, p in enumerate(prompts * 2):
        llm.engine.add(str(i), p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    llm.engine.step()
    assert len(llm.engine._inflight) >= 1
    workers = list(llm.driver.workers)
    llm.close()
    assert not llm.engine._inflight  # every posted receive was taken (gloo buffers small sends; NCCL would not)
    assert [w.exitcode for w in workers] == [0]
