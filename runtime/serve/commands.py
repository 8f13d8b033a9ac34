"""``tprun serve`` and ``tprun plan``: the server, and its memory table without loading anything."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from formats.errors import TpDeployError
from runtime.kv.format import KV_DTYPES

GIB = 1 << 30


def server_options(f):
    """Flags of the server that also shape the memory plan (largest step, context)."""
    for opt in reversed([
        click.option("--max-batch-size", type=int, default=64, show_default=True, help="Sequences per step."),
        click.option("--max-prefill-tokens", type=int, default=2048, show_default=True,
                     help="New tokens per step; longer prompts are prefilled in chunks of this size."),
        click.option("--gpu-mem", default=None,
                     help="Memory per rank to plan for (e.g. 24GiB) instead of measuring what is free."),
    ]):
        f = opt(f)
    return f


@click.command("serve")
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
@click.option("--enable-prefix-caching", is_flag=True, help="Share the KV blocks of repeated prompt prefixes.")
@click.option("--max-n", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most samples (n) one request may ask for; more get HTTP 400.")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM/SIGINT: seconds the requests in flight may take to finish; new ones get 503.")
@server_options
@click.pass_context
def serve_cmd(ctx, workspace: Path, host: str, port: int, api_key: str | None, served_model_name: str | None,
              max_concurrent_requests: int, max_queue: int, enable_prefix_caching: bool, max_n: int,
              shutdown_timeout: float, **options) -> None:
    """Serve WORKSPACE with an OpenAI-compatible API (continuous batching over the paged KV cache)."""
    import uvicorn

    from runtime.cli import open_llm
    from runtime.serve.app import Lifecycle, create_app
    from runtime.serve.engine import AsyncEngine
    from runtime.serve.metrics import Metrics
    from runtime.serve.plan import parse_size
    from runtime.serve.shutdown import GracefulServer, listen

    try:
        sock = listen(host, port)
        llm = open_llm(workspace, max_batch_size=options.pop("max_batch_size"),
                   max_prefill_tokens=options.pop("max_prefill_tokens"),
                   gpu_mem=None if options["gpu_mem"] is None else parse_size(options["gpu_mem"], "--gpu-mem"),
                   enable_prefix_caching=enable_prefix_caching, **{k: v for k, v in options.items() if k != "gpu_mem"})
    except TpDeployError as e:
        click.echo(f"tprun: error: {e}", err=True)
        sys.exit(2)
    click.echo(startup_table(llm), err=True)
    metrics, lifecycle = Metrics(), Lifecycle()
    engine = AsyncEngine(llm, metrics, max_concurrent_requests, max_queue)
    name = served_model_name or Path(workspace).resolve().name
    app = create_app(engine, served_model_name=name, api_key=api_key, metrics=metrics, max_n=max_n,
                     lifecycle=lifecycle)
    server = GracefulServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5), engine,
                            lifecycle, shutdown_timeout)
    llm.driver.on_rank_death = server.rank_died
    click.echo(f"tprun: serving {name!r} on http://{host}:{port}/v1 (tp {llm.manifest.tp})", err=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        llm.close()
    click.echo("tprun: stopped", err=True)
    sys.exit(server.exit_code)


def startup_table(llm) -> str:
    """Per rank: weights, reserve, KV bytes and tokens; and the concurrency that buys."""
    mem, n = llm.driver.runner.memory, llm.max_model_len
    kv = llm.driver.runner.cache.shape.fmt.name
    lines = [f"{'rank':>4} {'total GiB':>10} {'weights GiB':>12} {'reserve GiB':>12} {'KV GiB':>8} {'KV tokens':>10}"]
    for m in mem:
        lines.append(f"{m.rank:>4} {m.total / GIB:>10.2f} {m.weights / GIB:>12.2f} {m.reserve / GIB:>12.2f} "
                     f"{m.kv_bytes / GIB:>8.2f} {m.kv_tokens:>10}")
    tokens = mem[0].kv_tokens
    lines.append(f"KV cache: {kv}, {llm.blocks.num_blocks} blocks of {llm.blocks.block_size} tokens = {tokens} tokens "
                 f"per rank; maximum concurrency for {n}-token requests: {tokens / n:.2f}")
    return "\n".join(lines)


@click.command("plan")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--gpu-mem", required=True, help="Memory of one GPU, e.g. 24GiB, 80GB.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True)
@click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default="auto", show_default=True)
@click.option("--quant-policy", type=int, default=None, help="LMDeploy's spelling: 0, 8, 4.")
@click.option("--cache-max-entry-count", type=float, default=0.8, show_default=True)
@click.option("--kv-cache-tokens", type=int, default=None)
@click.option("--block-size", type=int, default=64, show_default=True)
@click.option("--max-model-len", type=int, default=None)
@click.option("--max-batch-size", type=int, default=64, show_default=True)
@click.option("--max-prefill-tokens", type=int, default=2048, show_default=True)
@click.option("--tp", type=int, default=None, help="Must match the workspace (it was converted for one tp).")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Also draw the plan as a bar chart.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(workspace: Path, gpu_mem: str, dtype: str, kv_dtype: str, quant_policy: int | None,
             cache_max_entry_count: float, kv_cache_tokens: int | None, block_size: int, max_model_len: int | None,
             max_batch_size: int, max_prefill_tokens: int, tp: int | None, png: Path | None, as_json: bool) -> None:
    """The per-rank memory table of `tprun serve` for WORKSPACE on a given GPU, without loading the model."""
    from runtime.api import _dtype
    from runtime.kv.format import from_quant_policy
    from runtime.memory import CacheConfig
    from runtime.serve.plan import format_table, parse_size, plan_memory
    from runtime.workspace import open_workspace

    try:
        manifest = open_workspace(workspace)
        if tp is not None and tp != manifest.tp:
            raise TpDeployError(f"--tp {tp} does not match the workspace, converted for tp {manifest.tp}; "
                                f"re-run `tpconv convert --tp {tp}` to plan for {tp} GPUs")
        if quant_policy is not None:
            kv_dtype = from_quant_policy(quant_policy)
        cache = CacheConfig(kv_dtype, block_size, cache_max_entry_count, kv_cache_tokens)
        plan = plan_memory(manifest, gpu_mem=parse_size(gpu_mem, "--gpu-mem"), cache=cache,
                           compute_dtype=_dtype(dtype, manifest.weights.dtype), max_model_len=max_model_len,
                           max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens)
        if png is not None:
            from runtime.serve.plan_png import draw
            draw(plan, png)
    except TpDeployError as e:
        click.echo(f"tprun: error: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else format_table(plan))
    for w in plan.warnings:
        click.echo(f"tprun: warning: {w}", err=True)

