"""The offline Python API, in the shape vLLM users know: ``LLM``, ``SamplingParams``, ``generate``, ``chat``.

    from runtime import LLM, SamplingParams
    with LLM("./workspace") as llm:
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        print(out[0].outputs[0].text)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formats.errors import TpDeployError
from formats.manifest import FLOAT_DTYPES
from runtime.engine.core import MAX_BATCH_TOKENS, Engine, OnDelta, Sequence
from runtime.engine.sampling import SamplingParams, TokenLogprobs
from runtime.engine.tokenizer import Tokenizer
from runtime.kv.blocks import BlockManager
from runtime.worker.launch import Driver
from runtime.worker.memory import CacheConfig
from runtime.worker.runner import RunnerSpec
from runtime.worker.workspace import open_workspace

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    logprobs: list[TokenLogprobs] | None = None


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class LLM:
    """Loads a workspace on ``tp`` ranks (one process each) and generates from rank 0."""

    def __init__(self, workspace: str | Path, *, device: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, max_batch_size: int = 64, seed: int | None = None,
                 cache: CacheConfig | None = None, max_prefill_tokens: int = MAX_BATCH_TOKENS,
                 enable_prefix_caching: bool = False):
        ws = Path(workspace)
        self.manifest = open_workspace(ws)
        cfg = self.manifest.model
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cpu", "cuda"):
            raise TpDeployError(f"--device must be cpu or cuda, got {device!r}")
        self.max_model_len = _max_model_len(max_model_len, cfg.max_position_embeddings)
        self.tokenizer = Tokenizer.from_workspace(ws)
        spec = RunnerSpec(ws, self.manifest, device, _dtype(dtype, self.manifest.weights.dtype), cache or CacheConfig(),
                          max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        self.driver = Driver(spec)
        kv = self.driver.runner.cache
        self.blocks = BlockManager(kv.num_blocks, kv.shape.block_size, enable_prefix_caching)
        self.engine = Engine(self.driver, self.tokenizer, self.blocks, cfg.vocab_size, self.max_model_len,
                             max_batch_size, seed, max_prefill_tokens)

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 on_delta: OnDelta | None = None) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids); one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(texts, ids, sampling_params, on_delta)

    def chat(self, messages: Messages | list[Messages], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, on_delta: OnDelta | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Answer one conversation (a list of {role, content}) or several, through the chat template;
        ``continue_final_message`` goes on with the last (assistant) message instead of a new turn."""
        if continue_final_message and add_generation_prompt:
            raise TpDeployError("continue_final_message needs add_generation_prompt=False (as in vLLM)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                    continue_final_message=continue_final_message)
                 for c in conversations]
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return self._run(texts, ids, sampling_params, on_delta)

    def prompt_logits(self, prompt: Prompt, chunk: int | None = None) -> torch.Tensor:
        """(T, vocab) float32 logits at every position of one prompt (scoring, perplexity, tests);
        ``chunk`` prefills it that many tokens per step (chunked prefill over the paged cache)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.engine.prompt_logits(ids, chunk)

    def _run(self, texts, ids, sampling_params, on_delta) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise TpDeployError(f"got {len(params)} SamplingParams for {len(ids)} prompts; give one, or one per prompt")
        results = self.engine.generate(ids, params, on_delta)
        return [RequestOutput(r, texts[r], ids[r], [_completion(s) for s in group]) for r, group in enumerate(results)]

    def close(self) -> None:
        if getattr(self, "driver", None) is not None:
            self.driver.close()
            self.driver = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _completion(s: Sequence) -> CompletionOutput:
    return CompletionOutput(s.index, s.text, list(s.out), s.finish_reason,
                            s.logprobs if s.params.logprobs is not None else None)


def _max_model_len(requested: int | None, model_max: int) -> int:
    if requested is None:
        return model_max
    if not 1 < requested <= model_max:
        raise TpDeployError(f"--max-model-len {requested} must be in [2, {model_max}] (the model's max_position_embeddings)")
    return requested


def _dtype(requested: str, stored: str) -> torch.dtype:
    name = stored if requested == "auto" else requested
    if name not in FLOAT_DTYPES:
        raise TpDeployError(f"--dtype {requested!r} is not supported; choose auto, {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]
