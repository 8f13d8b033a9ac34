"""The offline Python API, in the shape vLLM users know: ``LLM``, ``SamplingParams``, ``generate``, ``chat``.

    from runtime import LLM, SamplingParams
    with LLM("./workspace") as llm:
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        print(out[0].outputs[0].text)
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from formats.errors import TpDeployError
from runtime.config import CacheConfig, EngineConfig, compute_dtype
from runtime.engine.core import Engine
from runtime.engine.outputs import Delta
from runtime.engine.sampling import SamplingParams, TokenLogprobs
from runtime.engine.tokenizer import Tokenizer
from runtime.kv.blocks import BlockManager
from runtime.worker.launch import Driver, torchrun_follower
from runtime.worker.runner import RunnerSpec
from runtime.worker.workspace import open_workspace

Prompt = str | list[int]
Messages = list[dict[str, Any]]
OnDelta = Callable[[Delta, str], None]  # (a sample's step output, its new text) as the text becomes final


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
    """Loads a workspace on ``tp × pp`` ranks (one process each) and generates from rank 0.

    Under torchrun every process creates the LLM: rank 0 gets it, every other rank serves rank 0's steps
    inside the constructor and then ends its process (``sys.exit``) when rank 0 closes."""

    def __init__(self, workspace: str | Path | None = None, config: EngineConfig | None = None, *,
                 model: str | Path | None = None, cache: CacheConfig | None = None, **settings: Any):
        """``config``, or its fields by name as vLLM users write them (``LLM(model=ws, tensor_parallel_size=4,
        gpu_memory_utilization=0.9, max_model_len=4096, kv_dtype="int8")``); ``cache`` gives the KV-cache fields
        at once. Later ones win. ``model`` is vLLM's name for the workspace."""
        if (workspace is None) == (model is None):
            raise TpDeployError("give the workspace once: LLM(\"./ws\") or LLM(model=\"./ws\")")
        config = EngineConfig.of(cache, **{**(dataclasses.asdict(config) if config else {}), **settings})
        ws = Path(workspace if workspace is not None else model)
        self.config = config
        self.manifest = open_workspace(ws, config.tensor_parallel_size)
        cfg = self.manifest.model
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_model_len = _max_model_len(config.max_model_len, cfg.max_position_embeddings)
        self.tokenizer = Tokenizer.from_workspace(ws)
        spec = RunnerSpec(ws, self.manifest, device, compute_dtype(config.dtype, self.manifest.weights.dtype), config.cache,
                          max_batch_size=config.max_batch_size, max_prefill_tokens=config.max_prefill_tokens,
                          dist_timeout=config.dist_timeout, cpu_int4=config.cpu_int4)
        code = torchrun_follower(spec)
        if code is not None:  # under torchrun, a rank other than 0 serves rank 0's steps, then the process ends
            sys.exit(code)
        self.driver = Driver(spec)
        kv = self.driver.runner.cache
        self.blocks = BlockManager(kv.num_blocks, kv.shape.block_size, config.enable_prefix_caching, kv.tail_slots)
        self.engine = Engine(self.driver, self.tokenizer, self.blocks, cfg.vocab_size, self.max_model_len, config)

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
        params = [self._within_window(p, sp) for p, sp in zip(ids, params)]
        samples = {str(r): [_Sample() for _ in range(sp.n)] for r, sp in enumerate(params)}
        try:
            for request_id, prompt, sp in zip(samples, ids, params):
                self.engine.add(request_id, prompt, sp)
            while self.engine.has_work:
                for delta in self.engine.step():
                    samples[delta.request_id][delta.index].take(delta)
                    if on_delta is not None and (delta.text or delta.finish_reason):
                        on_delta(delta, delta.text)
        finally:  # an error mid-run must not leave requests (and their blocks) in the engine
            for request_id in samples:
                self.engine.abort(request_id)
        return [RequestOutput(r, texts[r], ids[r], [s.output(i, params[r]) for i, s in enumerate(group)])
                for r, group in enumerate(samples.values())]

    def _within_window(self, prompt: list[int], params: SamplingParams) -> SamplingParams:
        """Offline, as in vLLM, generation also ends at the context window (finish "length"): a max_tokens
        past it is lowered to fit instead of refused as the server does. The engine checks the rest."""
        room = self.max_model_len - len(prompt)
        if params.max_tokens is None or not 0 < room < params.max_tokens:
            return params
        return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))

    def get_tokenizer(self) -> Tokenizer:
        """The workspace tokenizer (vLLM's ``llm.get_tokenizer()``): encode, decode, apply_chat_template."""
        return self.tokenizer

    def close(self) -> None:
        if getattr(self, "driver", None) is not None:
            try:
                if self.driver.dead_rank() is None:
                    self.engine.drain()
            finally:
                self.driver.close()
            self.driver = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Sample:
    """One sample's step outputs put together."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def take(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def output(self, index: int, params: SamplingParams) -> CompletionOutput:
        return CompletionOutput(index, "".join(self.text), self.token_ids, self.finish_reason,
                                self.logprobs if params.logprobs is not None else None)


def _max_model_len(requested: int | None, model_max: int) -> int:
    if requested is None:
        return model_max
    if not 1 < requested <= model_max:
        raise TpDeployError(f"--max-model-len {requested} must be in [2, {model_max}] (the model's max_position_embeddings)")
    return requested
