"""Per-request sampling for a decode batch: vLLM-style ``SamplingParams`` and a batched ``Sampler``.

Why this module exists: one forward pass produces logits for many requests at once, and every request
brings its own parameters and (optionally) its own seed. Sampling must honour each row's parameters
without sorting the whole vocabulary for rows that do not need it, and a seeded request must produce
the same tokens whichever other requests happen to share its batch.

Order of operations for each row (HF transformers / vLLM semantics):

1. repetition penalty over every id in the row's history (prompt + generated so far):
   a positive logit is divided by the penalty, a negative one multiplied;
2. frequency and presence penalties over the GENERATED ids only (OpenAI's formula, as vLLM applies it):
   ``logit[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)``;
3. min_tokens: while a row has generated fewer than min_tokens, EOS and its stop_token_ids become -inf
   (EOS even with ignore_eos, as in vLLM), so even a greedy row takes the best other token;
4. greedy rows (temperature 0 or below 1e-5, or top_k 1) take the argmax; ties go to the lowest id
   (``torch.argmax``); a greedy row never touches its generator;
5. temperature scaling (``logits / T``);
6. top-k: logits below the k-th largest become -inf (logits tied with the k-th are all kept, as in HF);
7. softmax, then top-p: keep the smallest most-probable set whose mass reaches top_p (always the top
   token; equal probabilities at the boundary go to the lowest ids);
8. min-p: drop tokens whose probability is below ``min_p * max_prob`` (scale invariant, so no renormalising);
9. draw by inverse CDF: one float64 uniform per row from the row's own generator (or the sampler's
   shared one), so a seeded row's stream advances by exactly one number per sampled token.

Stop strings (and min_tokens' hold on them) are text, not logits: see ``runtime.stops``.

Logprobs are reported from ``log_softmax`` of the RAW logits (before penalties, masks, temperature and filters),
as vLLM and the OpenAI API do, so they describe the model rather than the sampling knobs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from formats.errors import TpDeployError
from runtime.engine.grammar import StructuredOutputs
from runtime.engine.penalties import Ids, apply_penalties, mask_stop_tokens

MAX_LOGPROBS = 20  # same cap as the OpenAI API's top_logprobs
# float32 cumsum over the sorted head can land a few ulps under top_p (0.5 + 0.3 -> 0.79999995);
# without this slack such rounding would pull one extra token into the nucleus.
_TOP_P_EPS = 1e-6
# Candidates sorted for top-p before falling back to a full-vocab sort (see _top_p_mask).
_TOP_P_CANDIDATES = 1024
# Below this, logits / T overflows float32 to inf and softmax turns to NaN; vLLM uses the same cut-off.
_GREEDY_TEMPERATURE = 1e-5
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_OPENAI_PENALTY_RANGE = 2.0  # presence / frequency penalties live in [-2, 2], as in the OpenAI API and vLLM


def _fail(msg: str) -> NoReturn:
    raise TpDeployError(msg)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_tuple(value: object, field: str, item_type: type) -> tuple:
    """Accept one item, a list or a tuple (what users pass in vLLM) and return a tuple."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, int)) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)):
        _fail(f"{field} must be a {item_type.__name__} or a list of them, got {value!r}")
    for item in items:
        ok = isinstance(item, str) if item_type is str else _is_int(item)
        if not ok:
            _fail(f"{field} entries must be {item_type.__name__}, got {item!r}")
    return tuple(items)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler; fields and defaults follow vLLM's ``SamplingParams``."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0  # 0 (anything below 1e-5) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled (-1 is normalised to 0)
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF's, over prompt + generated ids
    presence_penalty: float = 0.0  # OpenAI's, subtracted once from every generated id
    frequency_penalty: float = 0.0  # OpenAI's, subtracted once per occurrence in the generated ids
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # a stop string (or stop token's text) ends the text instead of being cut
    ignore_eos: bool = False
    min_tokens: int = 0  # generated before EOS / stop_token_ids can be sampled or a stop string can end the text
    logprobs: int | None = None  # top logprobs per token; 0 = only the chosen token's
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must follow
    # vLLM's older spelling of structured_outputs, one field per kind (folded into it)
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: Any = None
    guided_grammar: str | None = None

    def __post_init__(self) -> None:
        self._fold_guided()
        stop = _as_tuple(self.stop, "stop", str)
        if any(s == "" for s in stop):
            _fail("stop strings must be non-empty, got ''")
        stop_ids = _as_tuple(self.stop_token_ids, "stop_token_ids", int)
        if any(i < 0 for i in stop_ids):
            _fail(f"stop_token_ids must be >= 0, got {min(stop_ids)}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", stop_ids)
        if not isinstance(self.include_stop_str_in_output, bool):
            _fail(f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output!r}")
        self._check_counts()
        self._check_floats()
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    def _fold_guided(self) -> None:
        guided = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                  if getattr(self, f"guided_{k}") is not None}
        if not guided:
            return
        if self.structured_outputs is not None or len(guided) > 1:
            given = [f"guided_{k}" for k in guided] + (["structured_outputs"] if self.structured_outputs else [])
            _fail(f"give one output constraint, got {', '.join(given)}")
        object.__setattr__(self, "structured_outputs", StructuredOutputs(**guided))
        for k in guided:
            object.__setattr__(self, f"guided_{k}", None)

    def _check_counts(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            _fail(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            _fail(f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            _fail(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not _SEED_MIN <= self.seed <= _SEED_MAX):
            _fail(f"seed must be an integer in [-2**63, 2**64 - 1] (or None), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            _fail(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None), got {self.logprobs!r}")

    def _check_floats(self) -> None:
        for field in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                _fail(f"{field} must be a number, got {value!r}")
        # Written as `not (ok)` so that NaN fails every check.
        if not self.temperature >= 0:
            _fail(f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature):
            _fail(f"temperature must be finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            _fail(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            _fail(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            _fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for field in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, field)
            if not -_OPENAI_PENALTY_RANGE <= value <= _OPENAI_PENALTY_RANGE:
                _fail(f"{field} must be in [-2, 2], got {value}")

    @property
    def penalises_output(self) -> bool:
        """Whether the sampler needs this request's generated ids (presence / frequency penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        # Like vLLM, a temperature too small to divide by safely counts as 0.
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's private random stream; None (no seed) means "use the sampler's shared stream".

    Keep the generator with the request and pass it on every step: its state advances as it samples.
    """
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token, from log_softmax of the raw logits."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), highest first; empty when logprobs=0


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor  # (B,) int64, on the logits' device
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _top_k_mask(x: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """In place on ``x`` (R, V): logits below each row's k-th largest become -inf."""
    vocab = x.shape[1]
    rows = [r for r, k in enumerate(top_k) if 0 < k < vocab]
    if not rows:
        return x
    idx = _index(rows, x.device)
    ks = _index([top_k[r] for r in rows], x.device)
    sub = x[idx]  # (Rk, V)
    kth = sub.topk(int(ks.max()), dim=-1).values.gather(1, (ks - 1).unsqueeze(1))  # (Rk, 1)
    x[idx] = sub.masked_fill(sub < kth, float("-inf"))
    return x


def _nucleus_threshold(sorted_p: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For descending ``sorted_p`` (R, K): nucleus size (R, 1), its smallest probability (R, 1), and
    whether the K candidates held the whole nucleus (R,)."""
    cum = sorted_p.cumsum(dim=-1)  # (R, K), non-decreasing even in float32
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # (R, K)
    count = (mass_before < limit - _TOP_P_EPS).sum(dim=-1, keepdim=True).clamp_min_(1)  # top token always
    return count, sorted_p.gather(1, count - 1), cum[:, -1] >= limit.squeeze(1) - _TOP_P_EPS


def _top_p_mask(probs: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """In place on ``probs`` (R, V): zero everything outside each row's nucleus.

    Real LM distributions put the nucleus within the top few hundred tokens, so only the top
    ``_TOP_P_CANDIDATES`` are sorted; rows whose nucleus reaches past them sort the whole vocabulary.
    Equal probabilities at the boundary are kept lowest id first (like argmax), so the set never
    depends on how a sort happened to order ties (bf16 logits tie often).
    """
    rows = [r for r, p in enumerate(top_p) if p < 1.0]
    if not rows:
        return probs
    idx = _index(rows, probs.device)
    limit = torch.tensor([top_p[r] for r in rows], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    sub = probs[idx]  # (Rp, V)
    head = sub.topk(min(_TOP_P_CANDIDATES, sub.shape[1]), dim=-1).values  # (Rp, K), descending
    count, threshold, enough = _nucleus_threshold(head, limit)
    if not bool(enough.all()):
        short = (~enough).nonzero().squeeze(1)
        full = sub[short].sort(dim=-1, descending=True).values  # (Rs, V)
        count[short], threshold[short], _ = _nucleus_threshold(full, limit[short])
    probs[idx] = sub.masked_fill(~_keep_count(sub, count, threshold), 0.0)
    return probs


def _keep_count(sub: torch.Tensor, count: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Mask of exactly ``count`` tokens per row of ``sub`` (R, V): all above ``threshold``, then the
    lowest-id tokens equal to it. Only rows where ties overflow the nucleus pay for the cumsum."""
    keep = sub >= threshold  # (R, V)
    over = (keep.sum(dim=-1, keepdim=True) > count).squeeze(1).nonzero().squeeze(1)
    if over.numel():
        s, c, t = sub[over], count[over], threshold[over]
        tied = s == t  # (Ro, V)
        room = c - (s > t).sum(dim=-1, keepdim=True)  # (Ro, 1) >= 1: boundary slots left for tied tokens
        keep[over] = (s > t) | (tied & (tied.cumsum(dim=-1) <= room))
    return keep


def _min_p_mask(probs: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """In place on ``probs`` (R, V): zero tokens below ``min_p * max_prob``."""
    rows = [r for r, p in enumerate(min_p) if p > 0.0]
    if not rows:
        return probs
    idx = _index(rows, probs.device)
    scale = torch.tensor([min_p[r] for r in rows], dtype=probs.dtype, device=probs.device).unsqueeze(1)
    sub = probs[idx]  # (Rm, V)
    probs[idx] = sub.masked_fill(sub < sub.amax(dim=-1, keepdim=True) * scale, 0.0)
    return probs


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Steps 5-8 for non-greedy rows: (R, V) penalised logits -> (R, V) unnormalised probabilities."""
    assert logits.shape[0] == len(params), "one SamplingParams per row"
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    x = logits.float() / temps.unsqueeze(1)  # (R, V), a fresh tensor the masks may edit in place
    x = _top_k_mask(x, [p.top_k for p in params])
    probs = torch.softmax(x, dim=-1)
    probs = _top_p_mask(probs, [p.top_p for p in params])
    return _min_p_mask(probs, [p.min_p for p in params])


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Index i with probability p_i / sum(p), for (R, V) unnormalised ``probs`` and (R,) float64 uniforms.

    One uniform per row (not V exponential noises) keeps a 64 x 49152 draw at a few ms on CPU.
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # (R, V), float64 so the tail is resolved
    total = cdf[:, -1:]  # (R, 1)
    # strictly below the total, so `right=True` lands on a token with p > 0 even if u*total rounds up
    target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor,
              params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    idx = _index(rows, logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)  # (R, V)
    chosen = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
    n_top = min(max(params[i].logprobs for i in rows), lp.shape[1])
    top_v, top_i = lp.topk(n_top, dim=-1) if n_top > 0 else (lp[:, :0], lp[:, :0].long())
    top_v, top_i, ids = top_v.tolist(), top_i.tolist(), tokens[idx].tolist()
    for r, i in enumerate(rows):
        n = params[i].logprobs
        top = tuple(zip(top_i[r][:n], top_v[r][:n]))
        out[i] = TokenLogprobs(token_id=ids[r], logprob=chosen[r], top=top)
    return out


class Sampler:
    """Samples one token per row; rows without their own generator share one stream per device.

    ``seed`` seeds that shared stream (like vLLM's engine-level seed); None seeds it from OS entropy.
    It is deliberately not torch's global generator, which model code may consume or reseed.
    ``eos_token_ids`` are the model's EOS ids, masked (with each row's stop_token_ids) under min_tokens.
    """

    def __init__(self, seed: int | None = None, eos_token_ids: Iterable[int] = ()) -> None:
        self._seed = seed
        self._eos = tuple(sorted(eos_token_ids))
        self._shared: dict[torch.device, torch.Generator] = {}

    def shared_generator(self, device: torch.device) -> torch.Generator:
        gen = self._shared.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._shared[device] = gen
        return gen

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator | None], history: Sequence[Ids],
               outputs: Sequence[Ids], constrain: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SampleResult:
        """``logits`` (B, V); params, generators, history (prompt + generated ids) and outputs (generated
        ids) give one entry per row. Ids are read only where a penalty or min_tokens needs them.
        ``constrain`` (structured outputs) masks the penalised logits; logprobs stay the model's."""
        assert logits.dim() == 2, f"logits must be (B, V), got shape {tuple(logits.shape)}"
        assert len(params) == len(generators) == len(history) == len(outputs) == logits.shape[0], "one entry per row"
        device = logits.device
        work = apply_penalties(logits, params, history, outputs)  # (B, V) float32
        work = mask_stop_tokens(work, params, outputs, self._eos)
        if constrain is not None:
            work = constrain(work)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == len(params):  # the common batch: one argmax over all rows, no row copy
            tokens = work.argmax(dim=-1)
            return SampleResult(tokens=tokens, logprobs=_logprobs(logits, tokens, params))
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
        if greedy:
            idx = _index(greedy, device)
            tokens[idx] = work[idx].argmax(dim=-1)
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if rand:
            idx = _index(rand, device)
            probs = filtered_probs(work[idx], [params[i] for i in rand])  # (R, V)
            tokens[idx] = self._draw(probs, [generators[i] for i in rand])
        return SampleResult(tokens=tokens, logprobs=_logprobs(logits, tokens, params))

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One index per row of ``probs`` (R, V); a seeded row takes exactly one uniform from its own generator."""
        uniform = torch.empty(probs.shape[0], dtype=torch.float64, device=probs.device)  # (R,)
        shared = [r for r, g in enumerate(generators) if g is None]
        if shared:
            draws = torch.rand(len(shared), dtype=torch.float64, device=probs.device,
                               generator=self.shared_generator(probs.device))
            uniform[_index(shared, probs.device)] = draws
        for r, gen in enumerate(generators):
            if gen is not None:
                # Drawn on the generator's own device: a CPU generator gives the same stream for GPU logits.
                uniform[r] = torch.rand(1, dtype=torch.float64, device=gen.device, generator=gen).item()
        return _inverse_cdf(probs, uniform)
