"""Continuous batching without a model: chunked prefill, preemption, prefix caching, aborts.

A fake driver returns logits that always pick token (last input token + 1), so every sequence's
output is known in advance whatever the batch composition, chunking or preemption.
"""
import torch

from runtime.config import EngineConfig
from runtime.engine.core import Engine
from runtime.engine.sampling import SamplingParams
from runtime.kv.blocks import BlockManager
from runtime.worker.pipeline import PendingLogits

VOCAB = 1000


class CountingDriver:
    """Logits (B, V) whose argmax is each sequence's last input token + 1; records every step."""

    def __init__(self):
        self.steps = []

    def submit(self, step):
        return PendingLogits.done(self.execute(step))

    def execute(self, step):
        self.steps.append(step)
        ends = torch.tensor([s.new for s in step.batch.seqs]).cumsum(0) - 1
        last = torch.tensor(step.tokens)[ends]
        logits = torch.zeros(len(step.batch.seqs), VOCAB)
        logits[torch.arange(len(last)), (last + 1) % VOCAB] = 1.0
        self._check_blocks(step)
        return logits

    @staticmethod
    def _check_blocks(step):
        for s in step.batch.seqs:
            assert len(s.blocks) * 16 >= s.context, "a sequence runs without blocks for its context"
        written = [b for s in step.batch.seqs for b in s.blocks[(s.context - s.new) // 16:]]
        assert len(written) == len(set(written)), "two sequences write into the same block"


class Tok:
    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def engine(num_blocks=64, prefix=False, batch=8, batch_tokens=32) -> tuple[Engine, CountingDriver]:
    driver = CountingDriver()
    blocks = BlockManager(num_blocks, 16, prefix_caching=prefix)
    config = EngineConfig(max_batch_size=batch, max_prefill_tokens=batch_tokens)
    return Engine(driver, Tok(), blocks, VOCAB, max_model_len=512, config=config), driver


def expected(prompt, n):
    return [prompt[-1] + 1 + i for i in range(n)]


def generate(eng, prompts, params) -> list[list[list[int]]]:
    """Token ids per prompt, per sample, through the engine's contract: add, then step until done."""
    out = [[[] for _ in range(p.n)] for p in params]
    for r, (prompt, p) in enumerate(zip(prompts, params)):
        eng.add(str(r), prompt, p)
    while eng.has_work:
        for d in eng.step():
            out[int(d.request_id)][d.index] += d.token_ids
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=10)
PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + length)) for i, length in enumerate([1, 3, 17, 65, 40, 5])]


def test_long_prompts_are_prefilled_in_chunks_beside_decodes():
    eng, driver = engine(batch_tokens=32)
    outs = generate(eng, PROMPTS, [GREEDY] * len(PROMPTS))
    assert [g[0] for g in outs] == [expected(p, 10) for p in PROMPTS]
    assert max(len(s.tokens) for s in driver.steps) <= 32  # chunked: the 65-token prompt needs 3 steps
    mixed = [s for s in driver.steps if any(x.new == 1 for x in s.batch.seqs) and any(x.new > 1 for x in s.batch.seqs)]
    assert mixed, "a prefill chunk ran beside decodes"
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_preemption_under_a_tiny_cache_loses_nothing():
    eng, driver = engine(num_blocks=7, batch_tokens=64)  # 112 tokens: not enough for everyone at once
    params = SamplingParams(temperature=0, max_tokens=30)
    outs = generate(eng, PROMPTS, [params] * len(PROMPTS))
    assert [g[0] for g in outs] == [expected(p, 30) for p in PROMPTS]
    assert eng.stats().preemptions > 0
    assert eng.blocks.num_free == 7


def test_prefix_cache_shares_the_blocks_of_a_repeated_prompt():
    eng, driver = engine(prefix=True)
    system = list(range(200, 250))  # 50 tokens: three full blocks
    first = generate(eng, [system + [1, 2]], [GREEDY])[0][0]
    driver.steps.clear()
    second = generate(eng, [system + [3, 4, 5]], [GREEDY])[0][0]
    assert first == expected(system + [1, 2], 10) and second == expected(system + [3, 4, 5], 10)
    assert driver.steps[0].batch.seqs[0].new == 53 - 48  # 3 blocks (48 tokens) came from the cache
    assert eng.stats().prefix_hit == 48 and eng.stats().prefix_queried == 52 + 53
    assert eng.blocks.num_free == eng.blocks.num_blocks  # cached blocks count as free


def test_prefix_cache_off_recomputes_everything():
    eng, driver = engine(prefix=False)
    system = list(range(200, 250))
    generate(eng, [system + [1]], [GREEDY])
    driver.steps.clear()
    generate(eng, [system + [2]], [GREEDY])
    assert driver.steps[0].batch.seqs[0].new == 32  # first chunk of the full prompt (batch_tokens 32)


def test_abort_frees_blocks_at_once_and_others_continue():
    eng, _ = engine()
    eng.add("a", PROMPTS[3], GREEDY), eng.add("b", PROMPTS[2], GREEDY)
    b = [t for d in eng.step() + eng.step() if d.request_id == "b" for t in d.token_ids]
    used = eng.stats().kv_blocks_used
    eng.abort("a")
    assert eng.stats().kv_blocks_used < used
    while eng.has_work:
        deltas = eng.step()
        assert {d.request_id for d in deltas} == {"b"}
        b += [t for d in deltas for t in d.token_ids]
    assert b == expected(PROMPTS[2], 10) and eng.blocks.num_free == eng.blocks.num_blocks


def test_n_samples_each_get_their_own_blocks():
    eng, driver = engine()
    group = generate(eng, [PROMPTS[2]], [SamplingParams(temperature=0, max_tokens=5, n=3)])[0]
    assert group == [expected(PROMPTS[2], 5)] * 3
    tables = {}
    for step in driver.steps:
        for x in step.batch.seqs:
            tables[x.seq_id] = set(x.blocks)
    assert len(tables) == 3 and sum(map(len, tables.values())) == len(set().union(*tables.values()))
