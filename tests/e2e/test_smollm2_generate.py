"""The real SmolLM2 through tprun at tp 1 and 3 gives transformers' greedy tokens and logits."""
import pytest
import torch

from runtime.engine.sampling import SamplingParams
from tests.e2e.prompts import LOGIT_ATOL, NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
def test_greedy_tokens_identical_to_transformers(llms, reference, tp):
    outs = llms[tp].generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for p, o in zip(PROMPTS, outs):
        prompt_ids, ref_tokens, _ = reference[p]
        assert o.prompt_token_ids == prompt_ids
        assert o.outputs[0].token_ids == ref_tokens, p
        assert o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == NEW_TOKENS


@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
def test_last_position_logits_within_tolerance(llms, reference, tp):
    for p in PROMPTS:
        prompt_ids, _, ref_logits = reference[p]
        logits = llms[tp].prompt_logits(prompt_ids)[-1]
        torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)


def test_chat_matches_transformers_template_and_stops_at_eos(llms, hf_smollm2):
    model, tok = hf_smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    expected_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([expected_ids]), max_new_tokens=48, do_sample=False)[0, len(expected_ids):].tolist()
    for tp in (1, 3):
        out = llms[tp].chat(messages, SamplingParams(temperature=0, max_tokens=48))[0]
        assert out.prompt_token_ids == expected_ids
        assert out.prompt == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        c = out.outputs[0]
        assert c.token_ids == ref and c.token_ids[-1] == 2 and c.finish_reason == "stop"  # <|im_end|>
        assert "Paris" in c.text and "<|im_end|>" not in c.text


def test_stop_string_cut_across_tokens(llms):
    plain = llms[1].generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    stop = plain.text[9:15]  # a span that does not start on a token boundary in general
    out = llms[3].generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0].outputs[0]
    assert out.text == plain.text[:plain.text.index(stop)] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_batch_independent(llms):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1234, max_tokens=20)
    alone = llms[1].generate(PROMPTS[0], params)[0].outputs[0]
    batched = llms[1].generate([PROMPTS[1], PROMPTS[0], PROMPTS[3]],
                               [SamplingParams(temperature=1.0, max_tokens=20), params, SamplingParams(temperature=0.7, max_tokens=5)])
    assert batched[1].outputs[0].token_ids == alone.token_ids
    assert llms[3].generate(PROMPTS[0], params)[0].outputs[0].token_ids == alone.token_ids
    other = llms[1].generate(PROMPTS[0], SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=99, max_tokens=20))
    assert other[0].outputs[0].token_ids != alone.token_ids


def test_top_k_restricts_choices_and_n_samples_differ(llms):
    params = SamplingParams(temperature=1.5, top_k=3, seed=5, max_tokens=16, logprobs=3, n=3)
    out = llms[1].generate(PROMPTS[3], params)[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        for lp in o.logprobs:  # logprobs come from the raw logits: the chosen token is among their top 3
            assert lp.token_id in [t for t, _ in lp.top]
