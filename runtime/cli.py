"""The ``tprun`` command line."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from formats.errors import TpDeployError
from runtime import __version__


@click.group()
@click.version_option(__version__, prog_name="tprun")
def main() -> None:
    """Run tpdeploy workspaces with tensor parallelism: one process per rank, each mapping only its own shard."""


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
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Default: cuda when available.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True)
@click.option("--max-model-len", type=int, default=None, help="Context window (default: the model's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate_cmd(workspace: Path, prompt: str, chat: bool, system: str | None, max_tokens: int, temperature: float,
                 top_p: float, top_k: int, seed: int | None, device: str | None, dtype: str,
                 max_model_len: int | None, as_json: bool) -> None:
    """Generate from WORKSPACE, streaming tokens to the terminal as they are produced."""
    from runtime.api import LLM
    from runtime.sampling import SamplingParams

    t0 = time.perf_counter()
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        with LLM(workspace, device=device, dtype=dtype, max_model_len=max_model_len) as llm:
            loaded = time.perf_counter()
            stream = None if as_json else (lambda seq, delta: (sys.stdout.write(delta), sys.stdout.flush()))
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                out = llm.chat(messages, params, on_delta=stream)[0]
            else:
                out = llm.generate(prompt, params, on_delta=stream)[0]
    except TpDeployError as e:
        click.echo(f"tprun: error: {e}", err=True)
        sys.exit(2)
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
