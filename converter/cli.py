"""The ``tpconv`` command line: convert, verify, inspect."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click

from converter import __version__
from converter.convert import ConvertOptions, convert
from converter.multi import convert_many, parse_tps
from converter.verify import inspect as inspect_ws
from converter.verify import verify as verify_ws
from formats.errors import TpDeployError


def _fail(e: Exception) -> None:
    click.echo(f"tpconv: error: {e}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="tpconv")
def main() -> None:
    """Convert Hugging Face checkpoints into tensor-parallel tpdeploy workspaces."""


@main.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--dst-path", type=click.Path(path_type=Path), default=Path("./workspace"), show_default=True)
@click.option("--tp", default="1", show_default=True,
              help="Tensor-parallel degree (ranks per stage); several, e.g. 1,2,4, write DST/tp1, DST/tp2, ... "
                   "reading the source once.")
@click.option("--pp", type=int, default=1, show_default=True,
              help="Pipeline-parallel stages; the workspace holds tp x pp ranks, stages balanced by bytes.")
@click.option("--pp-layers", default=None, metavar="N,N,...",
              help="Decoder layers per stage, e.g. 10,10,8,2, instead of the balance by bytes.")
@click.option("--model-format", type=click.Choice(["auto", "hf", "awq"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True, help="Output dtype; auto keeps the checkpoint's.")
@click.option("--force", is_flag=True, help="Replace an existing workspace at --dst-path.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def convert_cmd(src: Path, dst_path: Path, tp: str, pp: int, pp_layers: str | None, model_format: str, dtype: str,
                force: bool, as_json: bool) -> None:
    """Convert SRC (a local HF checkpoint directory) into a workspace with one shard per rank."""
    bar = None

    def on_start(total: int):
        nonlocal bar
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting",
                   disable=not sys.stderr.isatty(), file=sys.stderr)
        return bar.update

    try:
        tps = parse_tps(tp)
        if pp_layers is not None and pp == 1:
            pp = len(pp_layers.split(","))  # the list says how many stages
        opts = ConvertOptions(src, dst_path, tps[0], model_format, dtype, force, pp, pp_layers)
        summaries = convert_many(opts, tps, on_start) if len(tps) > 1 else [convert(opts, on_start)]
    except TpDeployError as e:
        _fail(e)
    finally:
        if bar is not None:
            bar.close()
    if as_json and len(summaries) > 1:
        click.echo(json.dumps([_summary_dict(s) for s in summaries], indent=1))
        return
    for summary in summaries:
        _report(summary, as_json)


def _summary_dict(summary) -> dict:
    d = dataclasses.asdict(summary)
    d["total_bytes"] = summary.total_bytes
    d["mb_per_s"] = round(summary.total_bytes / 1e6 / max(summary.seconds, 1e-9), 1)
    return d


def _report(summary, as_json: bool) -> None:
    for note in summary.notes:
        click.echo(f"tpconv: note: {note}", err=True)
    for name in summary.unused_source_tensors:
        click.echo(f"tpconv: warning: source tensor {name!r} is not used by tp={summary.tp} conversion", err=True)
    if as_json:
        click.echo(json.dumps(_summary_dict(summary), indent=1))
    else:
        per_rank = ", ".join(f"{b / 1e6:.1f} MB" for b in summary.bytes_per_rank)
        click.echo(f"wrote {summary.workspace}: tp={summary.tp}, pp={summary.pp}, {summary.dtype}, {summary.files} files, "
                   f"per rank [{per_rank}] in {summary.seconds:.1f}s, peak RSS {summary.peak_rss_bytes / 1e6:.0f} MB")


@main.command("verify")
@click.argument("workspace", type=click.Path(path_type=Path))
def verify_cmd(workspace: Path) -> None:
    """Recompute every checksum and check every tensor against the manifest."""
    try:
        problems = verify_ws(workspace)
    except TpDeployError as e:
        _fail(e)
    for p in problems:
        click.echo(f"tpconv: verify: {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{workspace}: OK, every file and tensor matches the manifest")


@main.command("inspect")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(workspace: Path, as_json: bool) -> None:
    """Model, tp, bytes per rank (balance), dtypes and source of a workspace."""
    try:
        info = inspect_ws(workspace)
    except TpDeployError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    m = info["model"]
    click.echo(f"workspace  {info['workspace']}")
    click.echo(f"model      {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
               f"{m['num_heads']} heads / {m['num_kv_heads']} KV heads, vocab {m['vocab_size']} "
               f"(padded {info['padded_vocab_size']}), tied embeddings: {m['tie_word_embeddings']}")
    click.echo(f"weights    {info['dtype']}, tp={info['tp']}, pp={info['pp']} ({len(info['bytes_per_rank'])} ranks)")
    for s in info["stages"]:
        click.echo(f"stage {s['stage']:<4} layers {s['layers'][0]}..{s['layers'][1] - 1} ({s['num_layers']}), "
                   f"{s['bytes'] / 1e6:10.2f} MB{'  ' + s['holds'] if s['holds'] else ''}")
    if info["pp"] > 1:
        click.echo(f"stages     {info['stage_spread_percent']}% spread between largest and smallest stage")
    for r, b in enumerate(info["bytes_per_rank"]):
        stage, tp_rank = info["rank_stage"][r]
        click.echo(f"rank{r:<6} stage {stage} tp rank {tp_rank} {b / 1e6:10.2f} MB  {info['tensors_per_rank'][r]} tensors")
    click.echo(f"balance    {info['rank_spread_percent']}% spread between largest and smallest rank")
    if info["tied_lm_head_copy"]:
        click.echo("tied       the last stage holds its own vocab-parallel copy of the tied embedding as lm_head")
    click.echo(f"source     {info['source']['path']} ({info['source']['format']}, {len(info['source']['files'])} files)")
