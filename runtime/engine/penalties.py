"""Steps 1-2 of sampling (``runtime.engine.sampling``): the penalties, and min_tokens' mask.

Repetition penalty (HF's: over prompt + output), then OpenAI's frequency and presence penalties (over
the generated tokens only, as vLLM), then EOS and stop ids masked while a row is under its min_tokens.
Counts for every penalised row come from one bincount; rows without a penalty cost nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runtime.engine.sampling import SamplingParams

Ids = Sequence[int] | torch.Tensor  # one row's token ids


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], history: Sequence[Ids],
                    outputs: Sequence[Ids]) -> torch.Tensor:
    """Steps 1-2: float32 logits with the repetition, frequency and presence penalties; the input is never
    modified, and without a penalty in the batch nothing is copied or counted.

    ``history[i]`` holds row i's prompt + generated ids, ``outputs[i]`` its generated ids only (lists or
    1-D tensors); each is read only for rows whose penalty needs it. Ids >= vocab are ignored, like HF,
    since the model cannot emit them.
    """
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and len(history[i]) > 0]
    out = [i for i, p in enumerate(params) if p.penalises_output and len(outputs[i]) > 0]
    if not rep and not out:
        return logits.float()
    work = logits.to(torch.float32, copy=True)
    if rep:
        _repetition_penalty(work, rep, [params[i].repetition_penalty for i in rep], history)
    if out:
        _openai_penalties(work, out, [params[i] for i in out], outputs)
    return work


def _token_counts(ids: Sequence[Ids], rows: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """(len(rows), vocab) int64: how often each id occurs in ``ids[r]``, for every r in ``rows``, by one
    bincount over all rows at once (row j's ids are offset by j * vocab)."""
    per_row = [torch.as_tensor(ids[r], dtype=torch.long, device="cpu") for r in rows]
    flat = torch.cat(per_row)  # (N,)
    row = torch.arange(len(rows)).repeat_interleave(torch.tensor([t.numel() for t in per_row]))  # (N,)
    flat = (row * vocab + flat)[flat < vocab].to(device)
    return torch.bincount(flat, minlength=len(rows) * vocab).view(len(rows), vocab)  # (R, V)


def _repetition_penalty(work: torch.Tensor, rows: list[int], penalty: list[float], history: Sequence[Ids]) -> None:
    """In place on ``work`` (B, V): HF's rule on every id seen in each row's prompt + output."""
    idx = _index(rows, work.device)
    seen = _token_counts(history, rows, work.shape[1], work.device) > 0  # (R, V)
    scale = torch.tensor(penalty, dtype=torch.float32, device=work.device).unsqueeze(1)  # (R, 1)
    sub = work[idx]  # (R, V)
    work[idx] = torch.where(seen, torch.where(sub < 0, sub * scale, sub / scale), sub)


def _openai_penalties(work: torch.Tensor, rows: list[int], params: list[SamplingParams],
                      outputs: Sequence[Ids]) -> None:
    """In place on ``work`` (B, V): ``-= frequency * count + presence * (count > 0)`` over generated ids."""
    idx = _index(rows, work.device)
    counts = _token_counts(outputs, rows, work.shape[1], work.device).float()  # (R, V)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=work.device)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=work.device)
    work[idx] -= freq.unsqueeze(1) * counts + pres.unsqueeze(1) * (counts > 0)


def mask_stop_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], outputs: Sequence[Ids],
                     eos_token_ids: Iterable[int]) -> torch.Tensor:
    """Step 3: rows that have generated fewer than min_tokens get -inf at EOS and their stop_token_ids.

    vLLM masks EOS here even with ignore_eos: min_tokens means "this many tokens before any stop token".
    Returns ``logits`` itself when no row is masked, else a masked copy.
    """
    vocab = logits.shape[1]
    eos = tuple(eos_token_ids)
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(params):
        if p.min_tokens and len(outputs[i]) < p.min_tokens:
            ids = [t for t in (*p.stop_token_ids, *eos) if t < vocab]
            rows += [i] * len(ids)
            cols += ids
    if not rows:
        return logits
    where = (_index(rows, logits.device), _index(cols, logits.device))
    return logits.index_put(where, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
