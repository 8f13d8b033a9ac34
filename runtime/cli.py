"""The ``tprun`` command line."""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from formats.errors import TpDeployError
from runtime import __version__
from runtime.kv.format import KV_DTYPES


@click.group()
@click.version_option(__version__, prog_name="tprun")
def main() -> None:
    """Run tpdeploy workspaces with tensor parallelism: one process per rank, each mapping only its own shard."""


def runtime_options(f):
    """Device, dtype and KV-cache flags shared by every command that loads a workspace."""
    options = [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                     show_default=True),
        click.option("--max-model-len", type=int, default=None, help="Context window (default: the model's)."),
        click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default="auto", show_default=True,
                     help="KV cache precision; auto = the compute dtype."),
        click.option("--quant-policy", type=int, default=None, help="LMDeploy's spelling: 0 (off), 8 (int8), 4 (int4)."),
        click.option("--cache-max-entry-count", type=float, default=0.8, show_default=True,
                     help="λ: the KV cache takes this fraction of the memory left after the weights."),
        click.option("--kv-cache-tokens", type=int, default=None, help="An exact KV cache size in tokens instead of λ."),
        click.option("--block-size", type=int, default=64, show_default=True, help="Tokens per KV block (power of two)."),
    ]
    return functools.reduce(lambda g, opt: opt(g), reversed(options), f)


def open_llm(workspace: Path, device, dtype, max_model_len, kv_dtype, quant_policy, cache_max_entry_count,
             kv_cache_tokens, block_size, gpu_mem: int | None = None, **extra):
    """An LLM from the shared runtime flags (generate, perplexity, serve)."""
    from runtime.api import LLM
    from runtime.kv.format import from_quant_policy
    from runtime.memory import CacheConfig

    if quant_policy is not None:
        if kv_dtype != "auto":
            raise TpDeployError(f"--quant-policy {quant_policy} and --kv-dtype {kv_dtype} both set the KV precision; give one")
        kv_dtype = from_quant_policy(quant_policy)
    cache = CacheConfig(kv_dtype, block_size, cache_max_entry_count, kv_cache_tokens, gpu_mem)
    return LLM(workspace, device=device, dtype=dtype, max_model_len=max_model_len, cache=cache, **extra)


def _fail(e: TpDeployError) -> None:
    click.echo(f"tprun: error: {e}", err=True)
    sys.exit(2)


@main.command("generate")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text (with --chat: the user message).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message through the chat template.")
@click.option("--system", default=None, help="System message (with --chat).")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@runtime_options
def generate_cmd(workspace: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, as_json: bool, **runtime) -> None:
    """Generate from WORKSPACE, streaming tokens to the terminal as they are produced."""
    from runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        with open_llm(workspace, **runtime) as llm:
            loaded = time.perf_counter()
            stream = None if as_json else (lambda seq, delta: (sys.stdout.write(delta), sys.stdout.flush()))
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                out = llm.chat(messages, params, on_delta=stream)[0]
            else:
                out = llm.generate(prompt, params, on_delta=stream)[0]
    except TpDeployError as e:
        _fail(e)
    done = time.perf_counter()
    c = out.outputs[0]
    if as_json:
        click.echo(json.dumps({"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                               "prompt_tokens": out.num_prompt_tokens, "completion_tokens": len(c.token_ids),
                               "load_seconds": round(loaded - t0, 3), "generate_seconds": round(done - loaded, 3)}))
    else:
        click.echo()
        click.echo(f"[{c.finish_reason}: {out.num_prompt_tokens} prompt + {len(c.token_ids)} generated tokens, "
                   f"{len(c.token_ids) / max(done - loaded, 1e-9):.1f} tokens/s]", err=True)


@main.command("perplexity")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--file", "text_file", required=True, type=click.Path(path_type=Path), help="A plain-text (UTF-8) file.")
@click.option("--context", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--prefill-chunk", type=int, default=None, help="Prefill each window this many tokens per step.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@runtime_options
def perplexity_cmd(workspace: Path, text_file: Path, context: int, prefill_chunk: int | None, as_json: bool,
                   **runtime) -> None:
    """Perplexity of TEXT through the serving path, to judge a --kv-dtype on your own text."""
    from runtime.perplexity import perplexity

    try:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TpDeployError(f"cannot read --file {text_file}: {e}") from e
        with open_llm(workspace, max_batch_size=1, **runtime) as llm:
            ids = llm.tokenizer.encode(text)
            result = perplexity(llm, ids, context, prefill_chunk)
            kv = llm.driver.runner.cache.shape.fmt.name
    except TpDeployError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps({"kv_dtype": kv, **result.to_dict()}))
    else:
        click.echo(f"perplexity {result.perplexity:.4f} (kv {kv}; {result.windows} windows of {context} tokens, "
                   f"{result.scored_tokens} scored of {result.text_tokens})")


def _register_serving() -> None:
    from runtime.serve.commands import plan_cmd, serve_cmd

    main.add_command(runtime_options(serve_cmd))
    main.add_command(plan_cmd)


_register_serving()
