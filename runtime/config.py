"""One engine configuration: every setting that shapes how a workspace runs, with its one default.

``EngineConfig``'s fields are the command-line flags (``--max-batch-size`` is ``max_batch_size``):
``options(...)`` turns fields into click options for ``generate``, ``perplexity``, ``serve`` and
``plan``, and ``LLM``, the runner, the engine, the scheduler and the planner all read the same object,
so a default is written once and two commands cannot disagree. ``CacheConfig`` is its KV-cache part,
what the runner and the planner size the cache from.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import click
import torch

from formats.errors import TpDeployError
from formats.manifest import FLOAT_DTYPES
from runtime.kernels.cpu_int4 import MODES as CPU_INT4_MODES
from runtime.kv.format import BLOCK_SIZE, KV_DTYPES, QUANT_POLICY, from_quant_policy

DTYPES = ("auto", "float32", "float16", "bfloat16")
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "mistral", "none")  # serve --tool-call-parser (serve.tools)
REASONING_PARSERS = ("none", "deepseek_r1", "qwen3")  # serve --reasoning-parser (serve.reasoning)
DEFAULT_MAX_N = 16  # samples per request (serve --max-n): each is a sequence in the batch with its own KV blocks

# One letter (80g) is binary, as in Docker and the JVM; "GB" is decimal, "GiB" binary.
_UNITS = {"": 1, "b": 1,
          **{p: 1024 ** i for i, p in enumerate("kmgt", 1)}, **{f"{p}ib": 1024 ** i for i, p in enumerate("kmgt", 1)},
          **{f"{p}b": 1000 ** i for i, p in enumerate("kmgt", 1)}}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int, what: str = "size") -> int:
    """``24GiB``, ``24GB``, ``24000MiB``, ``80g`` or ``123456`` (bytes) as a positive byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise TpDeployError(
                f"{what} {text!r} is not a size; write bytes with an optional unit, e.g. 24GiB, 24GB, 24000MiB, "
                "80g or 123456 (binary: KiB MiB GiB TiB and k m g t; decimal: KB MB GB TB)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise TpDeployError(f"{what} {text!r} must be at least 1 byte")
    return value


def compute_dtype(requested: str, stored: str) -> torch.dtype:
    """The dtype the model computes in: ``--dtype``, or (auto) the workspace's."""
    name = stored if requested == "auto" else requested
    if name not in FLOAT_DTYPES:
        raise TpDeployError(f"--dtype {requested!r} is not supported; choose auto, {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _opt(default: Any, help: str, type: Any = None, aliases: tuple[str, ...] = ()) -> Any:
    """A field that is also a flag: its help text and click type travel in the field's metadata."""
    return field(default=default, metadata={"help": help, "type": type, "aliases": aliases})


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache's size: per rank KV = λ × (T − S/P − reserve), or an exact token count."""

    kv_dtype: str = "auto"  # auto (= compute dtype), fp32, fp16, bf16, int8, int4
    block_size: int = BLOCK_SIZE
    cache_max_entry_count: float = 0.8  # λ: fraction of the memory free after loading the weights
    kv_cache_tokens: int | None = None  # an exact size instead of λ (tests, CPU runs, reproducible plans)
    gpu_mem: int | None = None  # T: memory per rank to plan for, instead of measuring what is free
    gpu_memory_utilization: float | None = None  # vLLM's: a share of ALL memory (weights included) instead of λ

    def __post_init__(self):
        if self.kv_dtype not in KV_DTYPES:
            raise TpDeployError(f"--kv-dtype {self.kv_dtype!r} is not supported; choose one of {', '.join(KV_DTYPES)}")
        if not 0 < self.cache_max_entry_count <= 1:
            raise TpDeployError(f"--cache-max-entry-count must be in (0, 1], got {self.cache_max_entry_count}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise TpDeployError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise TpDeployError(f"--kv-cache-tokens must be >= 1, got {self.kv_cache_tokens}")
        if self.gpu_mem is not None and self.gpu_mem < 1:
            raise TpDeployError(f"--gpu-mem must be positive, got {self.gpu_mem}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise TpDeployError(f"--block-size must be a power of two, got {self.block_size}")


_CACHE_FIELDS = tuple(f.name for f in dataclasses.fields(CacheConfig))
_CACHE = CacheConfig()  # the engine's cache defaults are the cache's own


class _Size(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value, _flag(param.name) if param else "size")
        except TpDeployError as e:
            self.fail(str(e), param, ctx)


@dataclass(frozen=True)
class EngineConfig:
    """How a workspace runs. Defaults here are the only defaults: every command and API reads them."""

    device: str | None = _opt(None, "cpu or cuda (default: cuda when available).", click.Choice(["cpu", "cuda"]))
    dtype: str = _opt("auto", "Compute dtype; auto = the workspace's.", click.Choice(DTYPES))
    max_model_len: int | None = _opt(None, "Context window (default: the model's).", int)
    kv_dtype: str = _opt(_CACHE.kv_dtype, "KV cache precision; auto = the compute dtype.", click.Choice(KV_DTYPES),
                         aliases=("--kv-cache-dtype",))
    quant_policy: int | None = _opt(None, "LMDeploy's spelling of --kv-dtype: 0 (off), 8 (int8), 4 (int4).",
                                    click.Choice([str(k) for k in QUANT_POLICY]))
    cache_max_entry_count: float = _opt(_CACHE.cache_max_entry_count, "λ: the KV cache takes this fraction of the memory left after the "
                                             "weights and the reserve.", float)
    kv_cache_tokens: int | None = _opt(None, "An exact KV cache size in tokens instead of λ.", int)
    gpu_memory_utilization: float | None = _opt(
        None, "vLLM's knob, instead of λ: the share of ALL memory (weights and reserve included) the rank may use; "
              "the KV cache gets what is left of it.", float)
    block_size: int = _opt(_CACHE.block_size, "Tokens per KV block (power of two).", int)
    gpu_mem: int | None = _opt(None, "Memory per rank to plan for (e.g. 24GiB) instead of measuring what is free.",
                               _Size())
    max_batch_size: int = _opt(64, "Sequences per step.", int, aliases=("--max-num-seqs",))
    max_prefill_tokens: int = _opt(2048, "New tokens per step; longer prompts are prefilled in chunks of this size.",
                                   int, aliases=("--max-num-batched-tokens",))
    tensor_parallel_size: int | None = _opt(
        None, "The tp you expect (vLLM: --tensor-parallel-size, LMDeploy: --tp); it must match the workspace, "
              "which was converted for one.", int, aliases=("--tp", "-tp"))
    enable_prefix_caching: bool = _opt(False, "Share the KV blocks of repeated prompt prefixes.", bool)
    seed: int | None = _opt(None, "Seed of the sampler's shared stream (requests may bring their own).", int)
    dist_timeout: float = _opt(300.0, "Seconds every rank has to join, and the most any one collective or transfer "
                                      "between ranks may take before the run ends naming the rank.", float)
    cpu_int4: str = _opt("auto", "int4 weights on CPU: packed (torch's int4 kernel, bf16 activations), dequant-once "
                                 "(dense at load), reference (dequantize per call); auto: packed for 16-bit models, "
                                 "else dequant-once.", click.Choice(CPU_INT4_MODES))
    pipeline_batches: int | None = _opt(None, "Batches in flight through the pipeline stages (default: pp, so no "
                                              "stage waits; 1: one batch at a time).", int)

    def __post_init__(self) -> None:
        if self.quant_policy is not None:
            policy = int(self.quant_policy)
            kv_dtype = from_quant_policy(policy)
            if self.kv_dtype not in ("auto", kv_dtype):
                raise TpDeployError(f"--quant-policy {policy} and --kv-dtype {self.kv_dtype} both set the KV precision; "
                                    "give one")
            object.__setattr__(self, "quant_policy", policy)
            object.__setattr__(self, "kv_dtype", kv_dtype)
        if self.device not in (None, "cpu", "cuda"):
            raise TpDeployError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise TpDeployError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.dist_timeout <= 0:
            raise TpDeployError(f"--dist-timeout must be positive seconds, got {self.dist_timeout}")
        if self.pipeline_batches is not None and self.pipeline_batches < 1:
            raise TpDeployError(f"--pipeline-batches must be >= 1, got {self.pipeline_batches}")
        for name in ("max_batch_size", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise TpDeployError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise TpDeployError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise TpDeployError(f"--max-model-len must be >= 2, got {self.max_model_len}")
        self.cache  # noqa: B018 - validates the cache fields now, not at first use

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(**{name: getattr(self, name) for name in _CACHE_FIELDS})

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, cache: CacheConfig | None = None, **fields: Any) -> EngineConfig:
        """Fields by name (``LLM(ws, max_model_len=512)``), and optionally a whole ``CacheConfig``."""
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TpDeployError(f"unknown engine setting(s) {unknown}; known: {', '.join(FIELDS)}")
        if cache is not None:
            fields = {**dataclasses.asdict(cache), **fields}
        return cls(**fields)


DEFAULTS = EngineConfig()
FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def options(names: Iterable[str], **overrides: dict[str, Any]) -> Callable:
    """A decorator adding the click options of these fields (``overrides[name]`` changes one option's
    settings, e.g. ``gpu_mem={"required": True}`` for ``tprun plan``)."""
    by_name = {f.name: f for f in dataclasses.fields(EngineConfig)}

    def option(name: str) -> Callable:
        f = by_name[name]
        kind = f.metadata["type"]
        settings: dict[str, Any] = dict(help=f.metadata["help"], default=f.default, show_default=f.default is not None)
        if kind is bool:
            settings.update(is_flag=True, show_default=False)
        else:
            settings["type"] = kind
        settings.update(overrides.get(name, {}))
        return click.option(_flag(name), *f.metadata["aliases"], name, **settings)

    names = list(names)
    return lambda fn: functools.reduce(lambda g, n: option(n)(g), reversed(names), fn)


def from_options(values: dict[str, Any]) -> EngineConfig:
    """The config from a command's keyword arguments: pops every engine field out of ``values``."""
    fields = {name: values.pop(name) for name in FIELDS if name in values}
    if fields.get("quant_policy") is not None:
        fields["quant_policy"] = int(fields["quant_policy"])
    return EngineConfig(**fields)


def user_errors(prog: str) -> Callable:
    """A command decorator: a TpDeployError (the user's mistake) becomes ``prog: error: ...`` and exit 2."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TpDeployError as e:
                click.echo(f"{prog}: error: {e}", err=True)
                sys.exit(2)
        return run
    return wrap
