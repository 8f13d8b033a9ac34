"""Sampler semantics: parameter validation, greedy, filters (top-k/top-p/min-p), seeds and logprobs."""
import math

import pytest
import torch

from formats.errors import TpDeployError
from runtime.engine.penalties import apply_penalties, mask_stop_tokens
from runtime.engine.sampling import Sampler, SamplingParams, filtered_probs, make_generator

# Four tokens with known probabilities, so every filter's expected survivors can be worked out by hand.
KNOWN_PROBS = [0.5, 0.3, 0.15, 0.05]
KNOWN_LOGITS = torch.tensor(KNOWN_PROBS).log()
# Empirical frequencies over N_DRAWS have std <= sqrt(0.25 / N) ~= 0.0011; 0.01 is ~9 sigma, so a correct
# sampler essentially never fails, while a wrong temperature (checked below) is off by > 0.05.
N_DRAWS = 200_000
FREQ_TOL = 0.01


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """``n`` independent draws from one row of logits, done as one batch of n identical rows."""
    batch = logits.unsqueeze(0).expand(n, -1)  # (n, V)
    result = Sampler(seed=seed).sample(batch, [params] * n, [None] * n, [[]] * n, [[]] * n)
    return result.tokens


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(temperature=-1), r"^temperature must be >= 0, got -1$", id="temperature-negative"),
    pytest.param(dict(temperature=float("nan")), r"^temperature must be >= 0, got nan$", id="temperature-nan"),
    pytest.param(dict(temperature=float("inf")), r"^temperature must be finite, got inf$", id="temperature-inf"),
    pytest.param(dict(temperature="hot"), r"^temperature must be a number, got 'hot'$", id="temperature-str"),
    pytest.param(dict(top_p=0), r"^top_p must be in \(0, 1\], got 0$", id="top_p-zero"),
    pytest.param(dict(top_p=1.5), r"^top_p must be in \(0, 1\], got 1.5$", id="top_p-above-1"),
    pytest.param(dict(max_tokens=0), r"^max_tokens must be an integer >= 1 \(or None\), got 0$", id="max_tokens-0"),
    pytest.param(dict(n=0), r"^n must be an integer >= 1, got 0$", id="n-0"),
    pytest.param(dict(min_p=-0.1), r"^min_p must be in \[0, 1\], got -0.1$", id="min_p-negative"),
    pytest.param(dict(min_p=1.1), r"^min_p must be in \[0, 1\], got 1.1$", id="min_p-above-1"),
    pytest.param(dict(repetition_penalty=0), r"^repetition_penalty must be > 0, got 0$", id="penalty-0"),
    pytest.param(dict(logprobs=21), r"^logprobs must be an integer in \[0, 20\] \(or None\), got 21$",
                 id="logprobs-21"),
    pytest.param(dict(logprobs=-1), r"logprobs must be an integer in \[0, 20\]", id="logprobs-negative"),
    pytest.param(dict(top_k=-2), r"^top_k must be an integer >= 1, or 0 / -1 to disable, got -2$", id="top_k--2"),
    pytest.param(dict(seed=1.5), r"^seed must be an integer", id="seed-float"),
    pytest.param(dict(stop=["ok", ""]), r"^stop strings must be non-empty", id="stop-empty-string"),
    pytest.param(dict(stop=[3]), r"^stop entries must be str, got 3$", id="stop-not-str"),
    pytest.param(dict(stop_token_ids=[1, -5]), r"^stop_token_ids must be >= 0, got -5$", id="stop_token_ids-neg"),
    pytest.param(dict(min_tokens=-1), r"^min_tokens must be an integer >= 0, got -1$", id="min_tokens-negative"),
    pytest.param(dict(min_tokens=1.5), r"^min_tokens must be an integer >= 0, got 1.5$", id="min_tokens-float"),
    pytest.param(dict(min_tokens=17), r"^min_tokens must be <= max_tokens \(16\), got 17$", id="min_tokens-above-max"),
    pytest.param(dict(presence_penalty=2.5), r"^presence_penalty must be in \[-2, 2\], got 2.5$", id="presence-above-2"),
    pytest.param(dict(presence_penalty=float("nan")), r"^presence_penalty must be in \[-2, 2\], got nan$",
                 id="presence-nan"),
    pytest.param(dict(frequency_penalty=-3), r"^frequency_penalty must be in \[-2, 2\], got -3$", id="frequency-below-2"),
    pytest.param(dict(frequency_penalty="x"), r"^frequency_penalty must be a number, got 'x'$", id="frequency-str"),
    pytest.param(dict(include_stop_str_in_output="yes"), r"^include_stop_str_in_output must be a bool, got 'yes'$",
                 id="include-stop-str"),
])
def test_validation_names_field_and_range(kwargs, message):
    with pytest.raises(TpDeployError, match=message):
        SamplingParams(**kwargs)


def test_normalisation_and_greedy_property():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=7)
    assert (p.top_k, p.stop, p.stop_token_ids) == (0, ("###",), (7,))
    q = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])
    assert (q.stop, q.stop_token_ids) == (("a", "b"), (1, 2))
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert SamplingParams(temperature=1e-7).greedy  # logits / 1e-7 would overflow: treated as 0
    assert not SamplingParams().greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100  # no max_tokens: any min_tokens
    edge = SamplingParams(max_tokens=4, min_tokens=4, presence_penalty=-2, frequency_penalty=2)
    assert (edge.min_tokens, edge.presence_penalty, edge.frequency_penalty) == (4, -2, 2)
    defaults = SamplingParams()
    assert (defaults.min_tokens, defaults.presence_penalty, defaults.frequency_penalty,
            defaults.include_stop_str_in_output) == (0, 0.0, 0.0, False)


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    logits[3, 10] = logits[3, 70] = logits[3].max() + 1.0  # tie: argmax must pick id 10
    params = [SamplingParams(temperature=0)] * 8
    tokens = Sampler().sample(logits, params, [None] * 8, [[]] * 8, [[]] * 8).tokens
    assert tokens.dtype == torch.int64 and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[3].item() == 10


def test_top_k_1_equals_greedy():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.5, top_k=1)] * 16
    tokens = Sampler(seed=3).sample(logits, params, [None] * 16, [[]] * 16, [[]] * 16).tokens
    assert torch.equal(tokens, logits.argmax(dim=-1))


def run_request(seed: int, steps: int, others: int = 0) -> list[int]:
    """Decode ``steps`` tokens for one seeded request at row ``others // 2`` of a mixed batch."""
    target = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, seed=seed)
    gen, noise_gen = make_generator(seed), torch.Generator().manual_seed(99)
    row_gen = torch.Generator().manual_seed(1234)  # the request's logits, independent of the batch layout
    fillers = [SamplingParams(temperature=1.3), SamplingParams(temperature=0), SamplingParams(seed=5, top_k=7),
               SamplingParams(top_p=0.5, min_p=0.2, repetition_penalty=1.2),
               SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, min_tokens=3, stop_token_ids=[4])]
    sampler, out = Sampler(), []
    for _ in range(steps):
        row = torch.randn(1, 500, generator=row_gen)
        batch = torch.randn(others + 1, 500, generator=noise_gen)  # (B, V) other rows' logits
        pos = others // 2
        batch[pos] = row[0]
        params = [fillers[i % len(fillers)] for i in range(others + 1)]
        params[pos] = target
        gens = [make_generator(p.seed) for p in params]
        gens[pos] = gen
        history = [[1, 2, 3]] * (others + 1)
        history[pos] = []
        out.append(sampler.sample(batch, params, gens, history, history).tokens[pos].item())
    return out


def test_same_seed_same_tokens_different_seed_different():
    first, again, other = run_request(7, 20), run_request(7, 20), run_request(8, 20)
    assert first == again
    assert first != other


def test_seeded_request_independent_of_batch_mates():
    alone = run_request(42, 20, others=0)
    assert run_request(42, 20, others=5) == alone
    assert run_request(42, 20, others=11) == alone


@pytest.mark.parametrize("k", [1, 3, 5], ids=lambda k: f"top_k={k}")
def test_top_k_only_picks_k_largest(k):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(2))
    # high temperature flattens the distribution, so excluded tokens would show up if top-k leaked
    tokens = draw_many(logits, SamplingParams(temperature=5.0, top_k=k))
    assert set(tokens.tolist()) == set(logits.topk(k).indices.tolist())


@pytest.mark.parametrize("top_p, allowed", [
    pytest.param(0.8, {0, 1}, id="boundary-0.8"),
    pytest.param(0.81, {0, 1, 2}, id="just-past-0.8"),
    pytest.param(0.5, {0}, id="top-token-covers-0.5"),
    pytest.param(0.01, {0}, id="tiny-keeps-top"),
    pytest.param(1.0, {0, 1, 2, 3}, id="disabled"),
])
def test_top_p_samples_only_nucleus(top_p, allowed):
    tokens = draw_many(KNOWN_LOGITS, SamplingParams(top_p=top_p), n=20_000)
    assert set(tokens.tolist()) == allowed
    freq = frequencies(tokens, 4)
    mass = sum(KNOWN_PROBS[i] for i in allowed)
    for i in allowed:  # survivors keep their relative odds
        assert abs(freq[i].item() - KNOWN_PROBS[i] / mass) < 0.02


@pytest.mark.parametrize("top_p, allowed", [
    pytest.param(0.5, {0, 1}, id="half-of-four-ties"),
    pytest.param(0.3, {0, 1}, id="just-past-one-tie"),
    pytest.param(0.2, {0}, id="inside-first-tie"),
])
def test_top_p_ties_at_boundary_go_to_lowest_ids(top_p, allowed):
    probs = filtered_probs(torch.zeros(1, 4), [SamplingParams(top_p=top_p)])  # uniform: every token tied
    assert set(probs[0].nonzero().squeeze(1).tolist()) == allowed


def reference_nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Smallest most-probable set with mass >= top_p, by a plain float64 full sort."""
    order = probs.double().sort(descending=True)
    cum = order.values.cumsum(0)
    size = int((cum < top_p).sum()) + 1
    return set(order.indices[:size].tolist())


# scale 3 puts the nuclei at ~170 and ~10 tokens (inside the sorted head); 0.5 spreads them over thousands
@pytest.mark.parametrize("scale", [3.0, 0.5], ids=["peaked-nucleus-in-head", "flat-nucleus-needs-full-sort"])
def test_top_p_large_vocab_matches_full_sort(scale):
    logits = torch.randn(3, 5000, generator=torch.Generator().manual_seed(6)) * scale
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5), SamplingParams()]
    probs = filtered_probs(logits, params)
    for row, p in enumerate(params[:2]):
        kept = set(probs[row].nonzero().squeeze(1).tolist())
        assert kept == reference_nucleus(torch.softmax(logits[row], dim=-1), p.top_p)
    assert torch.equal(probs[2], torch.softmax(logits[2], dim=-1)), "top_p=1 must leave the row untouched"


@pytest.mark.parametrize("min_p, allowed", [
    pytest.param(0.2, {0, 1, 2}, id="min_p=0.2-threshold-0.1"),
    pytest.param(0.5, {0, 1}, id="min_p=0.5-threshold-0.25"),
    pytest.param(1.0, {0}, id="min_p=1-only-max"),
])
def test_min_p_drops_unlikely_tokens(min_p, allowed):
    tokens = draw_many(KNOWN_LOGITS, SamplingParams(min_p=min_p), n=20_000)
    assert set(tokens.tolist()) == allowed


def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temperature = 0.7
    freq = frequencies(draw_many(logits, SamplingParams(temperature=temperature), n=N_DRAWS), 8)
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert (freq - expected).abs().max().item() < FREQ_TOL
    # the tolerance is tight enough to tell temperature 0.7 from temperature 1
    assert (freq - torch.softmax(logits.double(), dim=-1)).abs().max().item() > 5 * FREQ_TOL


@pytest.mark.parametrize("penalty", [1.3, 0.7], ids=["discourage-1.3", "encourage-0.7"])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 64, generator=gen) * 3  # both signs present
    history = torch.randint(0, 64, (3, 12), generator=gen)  # with repeats, like real prompts
    expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(history, logits.clone())
    params = [SamplingParams(repetition_penalty=penalty)] * 3
    original = logits.clone()
    got = apply_penalties(logits, params, [h.tolist() for h in history], [[]] * 3)
    assert torch.equal(got, expected)
    assert torch.equal(logits, original), "the caller's logits must not be modified"


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=1.2)]
    assert Sampler().sample(logits, params, [None], [[5, 0]], [[]]).tokens.item() == 1  # 2.0 / 1.2 < 1.9
    assert Sampler().sample(logits, params, [None], [[]], [[]]).tokens.item() == 0


def test_logprobs_from_raw_logits_top_sorted():
    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=5),
              SamplingParams(logprobs=None),
              SamplingParams(temperature=0, logprobs=0),
              SamplingParams(top_k=3, logprobs=20, frequency_penalty=2, min_tokens=9, stop_token_ids=[5, 6])]
    result = Sampler(seed=0, eos_token_ids={7}).sample(logits, params, [None] * 4, [[0, 1, 2]] * 4, [[0, 1, 2]] * 4)
    raw = torch.log_softmax(logits, dim=-1)
    assert result.logprobs[1] is None
    for row, n in [(0, 5), (2, 0), (3, 20)]:
        lp = result.logprobs[row]
        token = result.tokens[row].item()
        assert lp.token_id == token
        assert math.isclose(lp.logprob, raw[row, token].item(), abs_tol=1e-6)
        assert len(lp.top) == n
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        expected = raw[row].topk(n) if n else None
        if n:
            assert [i for i, _ in lp.top] == expected.indices.tolist()
            assert torch.allclose(torch.tensor(values), expected.values, atol=1e-6)


def test_large_batch_mixed_params_shapes():
    logits = torch.randn(64, 49152)
    params = [SamplingParams(temperature=[0, 0.7, 1.0, 1.2][i % 4], top_p=[1.0, 0.9][i % 2],
                             top_k=[0, 40, 0][i % 3], seed=i if i % 5 == 0 else None) for i in range(64)]
    gens = [make_generator(p.seed) for p in params]
    tokens = Sampler().sample(logits, params, gens, [[]] * 64, [[]] * 64).tokens
    assert tokens.shape == (64,) and int(tokens.min()) >= 0 and int(tokens.max()) < 49152
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert torch.equal(tokens[greedy], logits[greedy].argmax(dim=-1))


# The penalty is subtracted in float32 (logit - (f * count + p)); float64 hand arithmetic differs by an ulp or two.
PENALTY_ATOL = 1e-5


def reference_openai_penalties(logits: torch.Tensor, outputs: list[list[int]], freq: list[float],
                               pres: list[float]) -> torch.Tensor:
    """The OpenAI formula written out token by token: logit[t] -= f * count(t) + p * (count(t) > 0)."""
    expected = logits.double().clone()
    for row, ids in enumerate(outputs):
        for t in set(ids):
            expected[row, t] -= freq[row] * ids.count(t) + pres[row]
    return expected


def test_frequency_and_presence_penalties_change_exactly_the_generated_tokens():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 40, generator=gen) * 3  # (B, V)
    prompts = [[30, 31, 32]] * 4  # prompt ids: never penalised by frequency / presence
    outputs = [[1, 5, 5, 5, 9, 1], [2, 2, 3], [7, 7], [4, 8, 39]]
    freq, pres = [0.5, 0.0, -1.5, 0.0], [0.0, 1.25, 2.0, 0.0]  # row 3: no penalty at all
    params = [SamplingParams(frequency_penalty=f, presence_penalty=p) for f, p in zip(freq, pres)]
    original = logits.clone()
    got = apply_penalties(logits, params, [p + o for p, o in zip(prompts, outputs)], outputs)
    torch.testing.assert_close(got.double(), reference_openai_penalties(logits, outputs, freq, pres),
                               atol=PENALTY_ATOL, rtol=0)
    changed = (got != logits).nonzero().tolist()
    assert changed == [[0, 1], [0, 5], [0, 9], [1, 2], [1, 3], [2, 7]]  # generated ids only, never the prompt
    assert torch.equal(logits, original), "the caller's logits must not be modified"


def test_repetition_penalty_then_openai_penalties_like_vllm():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(1, 30, generator=gen) * 2
    prompt, out = [3, 4, 5, 6], [6, 6, 7, 20]
    params = [SamplingParams(repetition_penalty=1.4, frequency_penalty=0.7, presence_penalty=0.3)]
    got = apply_penalties(logits, params, [prompt + out], [out])
    hf = RepetitionPenaltyLogitsProcessor(penalty=1.4)(torch.tensor([prompt + out]), logits.clone())
    expected = reference_openai_penalties(hf, [out], [0.7], [0.3])
    torch.testing.assert_close(got.double(), expected, atol=PENALTY_ATOL, rtol=0)


def test_penalties_ignore_ids_outside_the_vocab_and_accept_tensors():
    logits = torch.zeros(2, 8)
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(presence_penalty=1.0, repetition_penalty=2.0)]
    outputs = [torch.tensor([3, 3, 8, 100]), [0, 0, 9]]  # 8, 9, 100 >= vocab: the model cannot emit them
    got = apply_penalties(logits, params, [torch.tensor([1, 3]), [0, 7, 9]], outputs)
    assert got[0].tolist() == [0, 0, 0, -2, 0, 0, 0, 0]
    assert got[1].tolist() == [-1, 0, 0, 0, 0, 0, 0, 0]  # 0 / 2 stays 0; presence counts once


def test_rows_without_penalties_cost_nothing():
    logits = torch.randn(3, 16)
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(min_tokens=2)]
    assert apply_penalties(logits, params, [[1, 2]] * 3, [[1, 1]] * 3) is logits  # no copy, no count
    assert mask_stop_tokens(logits, params, [[1, 1]] * 3, eos_token_ids=(3,)) is logits  # 2 generated: met


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[2.0, 1.6, 1.0]])
    greedy = Sampler().sample(logits, [SamplingParams(temperature=0)], [None], [[0]], [[0]]).tokens.item()
    freq = [SamplingParams(temperature=0, frequency_penalty=0.25)]
    pres = [SamplingParams(temperature=0, presence_penalty=0.5)]
    assert greedy == 0
    assert Sampler().sample(logits, freq, [None], [[0]], [[0]]).tokens.item() == 0  # 1.75 > 1.6
    assert Sampler().sample(logits, freq, [None], [[0, 0]], [[0, 0]]).tokens.item() == 1  # 1.5 < 1.6
    assert Sampler().sample(logits, pres, [None], [[0, 0, 0]], [[0, 0, 0]]).tokens.item() == 1  # once: 1.5
    assert Sampler().sample(logits, pres, [None], [[0]], [[]]).tokens.item() == 0  # prompt ids do not count


EOS = 2
# EOS (2) is the best token, stop id 5 the runner-up, 7 the third: a greedy row under min_tokens must pick 7.
STOP_LOGITS = torch.tensor([[0.0, 0.5, 9.0, 1.0, 0.2, 8.0, 0.3, 7.0]])


@pytest.mark.parametrize("ignore_eos", [False, True], ids=["eos", "ignore_eos-still-masked"])
def test_min_tokens_masks_eos_and_stop_ids_until_reached(ignore_eos):
    params = [SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], ignore_eos=ignore_eos, logprobs=0)]
    sampler = Sampler(eos_token_ids={EOS})
    picks = []
    for generated in range(5):
        out = [1] * generated
        result = sampler.sample(STOP_LOGITS, params, [None], [[0] + out], [out])
        picks.append(result.tokens.item())
        # logprobs still describe the raw model, masked tokens included
        assert result.logprobs[0].logprob == pytest.approx(torch.log_softmax(STOP_LOGITS[0], 0)[picks[-1]].item())
    assert picks == [7, 7, 7, EOS, EOS]  # vLLM: stop ids stay masked (even EOS with ignore_eos) below min_tokens


def test_min_tokens_mask_is_per_row_and_leaves_input_alone():
    logits = STOP_LOGITS.expand(3, -1).contiguous()  # (3, V)
    params = [SamplingParams(min_tokens=2, stop_token_ids=[5, 99]),  # 99 >= vocab: ignored
              SamplingParams(min_tokens=2),
              SamplingParams(stop_token_ids=[5])]
    original = logits.clone()
    got = mask_stop_tokens(logits, params, [[4], [4, 4], []], eos_token_ids=(EOS,))
    expected = logits[0].clone()
    expected[[EOS, 5]] = float("-inf")
    assert torch.equal(got[0], expected)
    assert torch.equal(got[1:], logits[1:])  # row 1 has its 2 tokens; row 2 has no min_tokens
    assert torch.equal(logits, original)


def test_min_tokens_never_samples_a_stop_token():
    params = SamplingParams(temperature=3.0, min_tokens=1, stop_token_ids=[5])  # flat: every token is likely
    n = 4000
    tokens = Sampler(seed=0, eos_token_ids={EOS}).sample(
        STOP_LOGITS.expand(n, -1), [params] * n, [None] * n, [[]] * n, [[]] * n).tokens
    assert set(tokens.tolist()) == {0, 1, 3, 4, 6, 7}
