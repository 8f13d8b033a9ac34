"""Perplexity of a text through the serving path (paged cache, chosen KV precision), as llama.cpp's
``perplexity`` tool computes it: the text is cut into windows of ``context`` tokens, each window is
prefilled from an empty cache, and only its second half is scored, so every scored token has at least
``context / 2`` tokens of history."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from formats.errors import TpDeployError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    mean_nll: float
    windows: int
    context: int
    scored_tokens: int
    text_tokens: int
    per_window: list[float]  # perplexity of each window's scored half

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(llm, ids: list[int], context: int = 512, chunk: int | None = None) -> Perplexity:
    """Score ``ids`` (the tokenized text) in windows of ``context``; ``chunk`` sets the prefill chunk."""
    if context < 4:
        raise TpDeployError(f"--context must be >= 4, got {context}")
    if context > llm.max_model_len:
        raise TpDeployError(f"--context {context} exceeds the context window ({llm.max_model_len}); lower it")
    windows = len(ids) // context
    if windows == 0:
        raise TpDeployError(f"the text has {len(ids)} tokens, fewer than one window of --context {context}; "
                            "give a longer text or a smaller --context")
    first = context // 2  # logits at positions first..context-2 predict tokens first+1..context-1
    nlls, per_window = [], []
    for w in range(windows):
        window = ids[w * context:(w + 1) * context]
        logits = llm.prompt_logits(window, chunk)  # (context, vocab) float32
        targets = torch.tensor(window[first + 1:])
        nll = F.cross_entropy(logits[first:context - 1], targets, reduction="none")  # (context - first - 1,)
        nlls.append(nll)
        per_window.append(math.exp(nll.mean().item()))
    mean = torch.cat(nlls).double().mean().item()
    return Perplexity(math.exp(mean), mean, windows, context, sum(len(n) for n in nlls), len(ids), per_window)
