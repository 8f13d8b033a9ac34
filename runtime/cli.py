"""The ``tprun`` command line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from formats.errors import TpDeployError
from runtime import __version__
from runtime.config import (
    DEFAULT_MAX_N,
    REASONING_PARSERS,
    TOOL_CALL_PARSERS,
    EngineConfig,
    from_options,
    options,
    user_errors,
)


@click.group()
@click.version_option(__version__, prog_name="tprun")
def main() -> None:
    """Run tpdeploy workspaces with tensor parallelism: one process per rank, each mapping only its own shard."""


# Which engine settings each command takes as flags (their help and defaults: runtime.config).
LOAD = ("device", "dtype", "max_model_len", "kv_dtype", "quant_policy", "cache_max_entry_count", "kv_cache_tokens",
        "gpu_memory_utilization", "block_size", "dist_timeout", "cpu_int4", "tensor_parallel_size")
SERVE = (*LOAD, "gpu_mem", "max_batch_size", "max_prefill_tokens", "enable_prefix_caching", "seed", "pipeline_batches")
PLAN = ("gpu_mem", "dtype", "kv_dtype", "quant_policy", "cache_max_entry_count", "kv_cache_tokens",
        "gpu_memory_utilization", "block_size", "max_model_len", "max_batch_size", "max_prefill_tokens",
        "tensor_parallel_size")


def _torchrun_follower() -> bool:
    from runtime.worker.parallel import env_rank

    env = env_rank()
    return env is not None and env[0] != 0


def resolve_workspace(path: Path, config: EngineConfig) -> Path:
    """``path`` itself, or for a Hugging Face checkpoint its workspace, converted once by tpconv in a process
    of its own (``runtime.worker.autoconvert``) for ``--tp`` (default 1)."""
    from runtime.worker.autoconvert import is_checkpoint, workspace_for
    from runtime.worker.parallel import env_rank

    if not is_checkpoint(path):
        return path
    tp = config.tensor_parallel_size or 1
    if env_rank() is not None:  # every node would convert at once, each for itself
        raise TpDeployError(f"{path} is a Hugging Face checkpoint; under torchrun convert it first, on every node "
                            f"(or on shared storage): tpconv convert {path} -o WS --tp {tp}, and pass WS")
    return workspace_for(path, tp, say=lambda m: click.echo(m, err=True))


def open_llm(workspace: Path, config: EngineConfig):
    from runtime.api import LLM

    return LLM(resolve_workspace(workspace, config), config)


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
@options(LOAD)
@user_errors("tprun")
def generate_cmd(workspace: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, as_json: bool, **settings) -> None:
    """Generate from WORKSPACE, streaming tokens to the terminal as they are produced."""
    from runtime.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    with open_llm(workspace, from_options(settings)) as llm:
        loaded = time.perf_counter()
        stream = None if as_json else (lambda seq, delta: (sys.stdout.write(delta), sys.stdout.flush()))
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            out = llm.chat(messages, params, on_delta=stream)[0]
        else:
            out = llm.generate(prompt, params, on_delta=stream)[0]
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
@click.option("--prefill-chunk", type=int, default=None,
              help="Prefill each window this many tokens per step; the device then holds this many positions of "
                   "logits (x vocab x 4 B) at a time instead of the whole window's.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@options(LOAD)
@user_errors("tprun")
def perplexity_cmd(workspace: Path, text_file: Path, context: int, prefill_chunk: int | None, as_json: bool,
                   **settings) -> None:
    """Perplexity of TEXT through the serving path, to judge a --kv-dtype on your own text."""
    from runtime.perplexity import perplexity

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TpDeployError(f"cannot read --file {text_file}: {e}") from e
    with open_llm(workspace, from_options(settings).replace(max_batch_size=1)) as llm:
        ids = llm.tokenizer.encode(text)
        result = perplexity(llm, ids, context, prefill_chunk)
        kv = llm.driver.runner.cache.shape.fmt.name
    if as_json:
        click.echo(json.dumps({"kv_dtype": kv, **result.to_dict()}))
    else:
        click.echo(f"perplexity {result.perplexity:.4f} (kv {kv}; {result.windows} windows of {context} tokens, "
                   f"{result.scored_tokens} scored of {result.text_tokens})")


@main.command("serve")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--host", "--server-name", "host", default="127.0.0.1", show_default=True,
              help="Address to bind (LMDeploy: --server-name). 0.0.0.0 exposes the server to the network.")
@click.option("--port", "--server-port", "port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="TPRUN_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")
@click.option("--served-model-name", default=None, help="Model id clients send (default: the workspace name).")
@click.option("--max-concurrent-requests", type=int, default=256, show_default=True,
              help="Requests admitted into the batch at once; more wait in the queue (not the cache size).")
@click.option("--max-queue", type=int, default=1024, show_default=True,
              help="Requests allowed to wait beyond --max-concurrent-requests; more get HTTP 429.")
@click.option("--max-n", type=click.IntRange(min=1), default=DEFAULT_MAX_N, show_default=True,
              help="Most samples (n) one request may ask for; more get HTTP 400.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds the requests in flight may take to finish; new ones get 503.")
@click.option("--tool-call-parser", type=click.Choice(TOOL_CALL_PARSERS), default="auto", show_default=True,
              help="How tool calls are read from the output with tool_choice auto; auto: from the chat template.")
@click.option("--reasoning-parser", type=click.Choice(REASONING_PARSERS), default="none", show_default=True,
              help="Split <think>...</think> into reasoning_content (deepseek_r1: the template opens it; qwen3).")
@options(SERVE)
@user_errors("tprun")
def serve_cmd(workspace: Path, host: str, port: int, api_key: str | None, served_model_name: str | None,
              max_concurrent_requests: int, max_queue: int, max_n: int, shutdown_timeout: float,
              tool_call_parser: str, reasoning_parser: str, **settings) -> None:
    """Serve WORKSPACE with an OpenAI-compatible API (continuous batching over the paged KV cache)."""
    import uvicorn

    from runtime.serve.app import create_app
    from runtime.serve.async_engine import AsyncEngine
    from runtime.serve.metrics import Metrics
    from runtime.serve.middleware import Lifecycle
    from runtime.serve.plan import startup_table
    from runtime.serve.shutdown import GracefulServer, listen

    config = from_options(settings)
    if _torchrun_follower():
        open_llm(workspace, config)  # serves rank 0's steps, then ends the process
    sock = listen(host, port)  # before loading: a port in use fails in a second, not after the load
    metrics, lifecycle = Metrics(), Lifecycle()
    # loaded on the engine's thread, which steps it and closes it (AsyncEngine.load says why)
    engine = AsyncEngine.load(lambda: open_llm(workspace, config), metrics, max_concurrent_requests, max_queue)
    llm = engine.llm
    click.echo(startup_table(llm), err=True)
    name = served_model_name or Path(workspace).resolve().name
    app = create_app(engine, served_model_name=name, api_key=api_key, metrics=metrics, max_n=max_n,
                     lifecycle=lifecycle, tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser)
    server = GracefulServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5), engine,
                            lifecycle, shutdown_timeout)
    llm.driver.on_rank_death = server.rank_died
    click.echo(f"tprun: serving {name!r} on http://{host}:{port}/v1 (tp {llm.manifest.tp}, pp {llm.manifest.pp})",
               err=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    click.echo("tprun: stopped", err=True)
    sys.exit(server.exit_code)


@main.command("plan")
@click.argument("workspace", type=click.Path(path_type=Path))
@options(PLAN, gpu_mem={"required": True, "help": "Memory of one GPU, e.g. 24GiB, 80GB."})
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the plan as a bar chart.")
@click.option("--json", "as_json", is_flag=True)
@user_errors("tprun")
def plan_cmd(workspace: Path, png: Path | None, as_json: bool, **settings) -> None:
    """The per-rank memory table of `tprun serve` for WORKSPACE on a given GPU, without loading the model."""
    from runtime.serve.plan import format_table, plan_for
    from runtime.worker.workspace import open_workspace

    config = from_options(settings)
    manifest = open_workspace(resolve_workspace(workspace, config), config.tensor_parallel_size)
    plan = plan_for(manifest, config)
    if png is not None:
        from runtime.serve.plan_png import draw
        draw(plan, png)
    click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else format_table(plan))
    for w in plan.warnings:
        click.echo(f"tprun: warning: {w}", err=True)
