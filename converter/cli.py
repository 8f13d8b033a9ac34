"""The ``tpconv`` command line: convert, key, verify, inspect; exit codes in ``docs/ci.md``."""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import click

from converter import __version__
from converter.cachekey import cache_key, combined_key, hash_source
from converter.convert import ConvertOptions, ConvertSummary, Progress, convert
from converter.multi import convert_many, parse_tps
from converter.numerics import RTOL, verify_numerics
from converter.verify import inspect as inspect_ws
from converter.verify import verify as verify_ws
from formats.errors import FormatError, TpDeployError, VerificationError


def _exits(as_json_arg: str | None = None):
    """Turn what a command raises into its exit code (``docs/ci.md``): the error's own code for a
    TpDeployError, 1 with the traceback for anything else (a bug, never blamed on the input).
    With ``--json`` the error is also the command's one JSON object on stdout."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except TpDeployError as e:
                code, message = e.exit_code, str(e)
            except BrokenPipeError:  # `tpconv inspect WS | head`: the reader left; nothing to report
                sys.stderr.close()
                sys.exit(141)
            except Exception as e:  # noqa: BLE001 -- reported, with its traceback, as tpconv's own fault
                traceback.print_exc()
                code, message = 1, f"internal error ({type(e).__name__}: {e}); please report it"
            if as_json_arg and kwargs.get(as_json_arg):
                click.echo(json.dumps({"status": "error", "exit_code": code, "error": message}, indent=1))
            click.echo(f"tpconv: error: {message}", err=True)
            sys.exit(code)
        return run
    return wrap


@click.group()
@click.version_option(__version__, prog_name="tpconv")
def main() -> None:
    """Convert Hugging Face checkpoints into tensor-parallel tpdeploy workspaces."""


def _byte_options(fn):
    """The options that decide a workspace's bytes, shared by ``convert`` and ``key``."""
    options = [
        click.option("--tp", default="1", show_default=True,
                     help="Tensor-parallel degree (ranks per stage); several, e.g. 1,2,4, write DST/tp1, DST/tp2, "
                          "... reading the source once."),
        click.option("--pp", type=int, default=1, show_default=True,
                     help="Pipeline-parallel stages; the workspace holds tp x pp ranks, stages balanced by bytes."),
        click.option("--pp-layers", default=None, metavar="N,N,...",
                     help="Decoder layers per stage, e.g. 10,10,8,2, instead of the balance by bytes."),
        click.option("--model-format", type=click.Choice(["auto", "hf", "awq"]), default="auto", show_default=True),
        click.option("--dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
                     show_default=True, help="Output dtype; auto keeps the checkpoint's."),
        click.option("--ep", is_flag=True,
                     help="Mixture-of-experts models: each rank holds num_experts/tp whole experts (expert "
                          "parallel) instead of a 1/tp slice of every expert."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _options(src: Path, dst_path: Path, tp: str, pp: int, pp_layers: str | None, model_format: str, dtype: str,
             **flags) -> tuple[list[int], ConvertOptions]:
    tps = parse_tps(tp)
    if pp_layers is not None and pp == 1:
        pp = len(pp_layers.split(","))  # the list says how many stages
    return tps, ConvertOptions(src, dst_path, tps[0], model_format, dtype, pp=pp, pp_layers=pp_layers, **flags)


@main.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--dst-path", type=click.Path(path_type=Path), default=Path("./workspace"), show_default=True)
@_byte_options
@click.option("--pad-heads", is_flag=True,
              help="Add zero attention heads so that --tp divides them (same outputs; inspect shows the cost).")
@click.option("--force", is_flag=True, help="Replace an existing workspace at --dst-path, even one up to date.")
@click.option("--resume", is_flag=True, help="Keep the rank files a killed conversion of the same key wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable object at the end.")
@_exits("as_json")
def convert_cmd(src: Path, dst_path: Path, tp: str, pp: int, pp_layers: str | None, model_format: str, dtype: str,
                ep: bool, pad_heads: bool, force: bool, resume: bool, as_json: bool) -> None:
    """Convert SRC (a local HF checkpoint directory) into a workspace with one shard per rank.

    A --dst-path that already holds this conversion's workspace (same cache key, verifies) is left as
    it is and the command exits 0 at once.
    """
    tps, opts = _options(src, dst_path, tp, pp, pp_layers, model_format, dtype, pad_heads=pad_heads, force=force,
                         resume=resume, ep=ep)
    drawn: list[LineProgress] = []

    def on_start(total: int, groups: int) -> LineProgress:
        drawn.append(LineProgress(total, groups))
        return drawn[0]

    try:
        summaries = convert_many(opts, tps, on_start) if len(tps) > 1 else [convert(opts, on_start)]
    finally:
        for bar in drawn:
            bar.close()
    warnings = _warnings(summaries[0])
    for w in warnings:
        click.echo(f"tpconv: {w}", err=True)
    if as_json:
        if len(summaries) == 1:
            click.echo(json.dumps({**_summary_dict(summaries[0]), "warnings": warnings}, indent=1))
        else:
            click.echo(json.dumps(_many_dict(summaries, warnings), indent=1))
        return
    for summary in summaries:
        click.echo(_report(summary))


def _warnings(summary: ConvertSummary) -> list[str]:
    return ([f"note: {n}" for n in summary.notes]
            + [f"warning: source tensor {name!r} is not used by the conversion" for name in summary.unused_source_tensors])


def _summary_dict(summary: ConvertSummary) -> dict:
    d = dataclasses.asdict(summary)
    d["total_bytes"] = summary.total_bytes
    d["mb_per_s"] = round(summary.total_bytes / 1e6 / max(summary.seconds, 1e-9), 1)
    d["ranks"] = [{"rank": r, "bytes": b, "sha256": h}
                  for r, (b, h) in enumerate(zip(summary.bytes_per_rank, summary.rank_sha256))]
    return d


def _many_dict(summaries: list[ConvertSummary], warnings: list[str]) -> dict:
    status = "up to date" if all(s.status == "up to date" for s in summaries) else "converted"
    return {"status": status, "key": combined_key([s.key for s in summaries]), "seconds": summaries[0].seconds,
            "peak_rss_bytes": summaries[0].peak_rss_bytes, "warnings": warnings,
            "workspaces": [_summary_dict(s) for s in summaries]}


def _report(summary: ConvertSummary) -> str:
    if summary.status == "up to date":
        return (f"{summary.workspace}: up to date (key {summary.key[:16]}…, tp={summary.tp}, pp={summary.pp}); "
                "nothing converted, pass --force to convert again")
    per_rank = ", ".join(f"{b / 1e6:.1f} MB" for b in summary.bytes_per_rank)
    kept = f", {summary.resumed_files} files kept from the killed conversion" if summary.resumed_files else ""
    return (f"wrote {summary.workspace}: tp={summary.tp}, pp={summary.pp}, {summary.dtype}, {summary.files} files, "
            f"per rank [{per_rank}] in {summary.seconds:.1f}s, peak RSS {summary.peak_rss_bytes / 1e6:.0f} MB{kept}")


class LineProgress(Progress):
    """A tqdm bar of bytes on a terminal; otherwise (CI logs) one line per file group on stderr."""

    def __init__(self, total: int, groups: int):
        self._total, self._groups, self._done, self._bytes = total, groups, 0, 0
        self._t0 = time.perf_counter()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", file=sys.stderr)

    def wrote(self, nbytes: int) -> None:
        self._bytes += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)

    def group_done(self, label: str) -> None:
        self._done += 1
        if self._bar is None:
            click.echo(f"tpconv: [{self._done}/{self._groups}] {label}: {self._bytes / 1e6:.1f} MB written "
                       f"in {time.perf_counter() - self._t0:.1f}s", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@main.command("key")
@click.argument("src", type=click.Path(path_type=Path))
@_byte_options
@click.option("--pad-heads", is_flag=True, help="As for convert.")
@click.option("--json", "as_json", is_flag=True, help="Also print the hashed files and options.")
@_exits("as_json")
def key_cmd(src: Path, tp: str, pp: int, pp_layers: str | None, model_format: str, dtype: str, ep: bool,
            pad_heads: bool, as_json: bool) -> None:
    """Print the cache key of converting SRC with these options (the manifest records it).

    Derived from the sha256 of every file at the top of SRC, every option that changes bytes and the
    converter's version; no tensor is read. Use it as a CI cache key (docs/ci.md).
    """
    tps, opts = _options(src, Path("."), tp, pp, pp_layers, model_format, dtype, pad_heads=pad_heads, ep=ep)
    files = hash_source(src)
    keys = [cache_key(files, opts.key_options(t)) for t in tps]
    key = keys[0] if len(keys) == 1 else combined_key(keys)
    if as_json:
        click.echo(json.dumps({"key": key, "tp": tps, "per_tp": dict(zip(map(str, tps), keys)),
                               "options": dataclasses.asdict(opts.key_options()),
                               "files": [dataclasses.asdict(f) for f in files]}, indent=1))
    else:
        click.echo(key)


@main.command("verify")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.argument("src", type=click.Path(path_type=Path), required=False)
@click.option("--numerics", is_flag=True,
              help="Also run every rank's layers against the source checkpoint (SRC, or the manifest's source path).")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable object at the end.")
@_exits("as_json")
def verify_cmd(workspace: Path, src: Path | None, numerics: bool, as_json: bool) -> None:
    """Recompute every checksum and check every tensor against the manifest (exit 4 on a mismatch).

    With --numerics, also compute the first and last decoder layer of every stage, the embedding and
    the lm_head from each rank's shard, reduce them as tprun does, and compare with the same layers
    computed from the source checkpoint: a shard cut wrongly hashes fine but fails here.
    """
    if src is not None and not numerics:
        raise TpDeployError("a source checkpoint is only read with --numerics; add --numerics or drop SRC")
    if not workspace.is_dir():
        raise TpDeployError(f"{workspace} is not a directory; pass a workspace written by `tpconv convert`")
    try:
        problems = verify_ws(workspace)
    except FormatError as e:  # no readable manifest: the workspace fails verification
        raise VerificationError(str(e)) from e
    report = verify_numerics(workspace, src) if numerics and not problems else None
    problems += report.problems if report else []
    for p in problems:
        click.echo(f"tpconv: verify: {p}", err=True)
    if as_json:  # the one object, failed or not
        click.echo(json.dumps({"status": "failed" if problems else "ok", "problems": problems,
                               "numerics": dataclasses.asdict(report) if report else None}, indent=1))
        sys.exit(VerificationError.exit_code if problems else 0)
    if problems:
        raise VerificationError(f"{workspace}: {len(problems)} problem(s); the first: {problems[0]}")
    click.echo(f"{workspace}: OK, every file and tensor matches the manifest")
    if report:
        click.echo(f"{workspace}: numerics OK, {report.checks} rank outputs within {RTOL:g} of the source "
                   f"(largest relative error {report.worst:.2g}) in {report.seconds:.1f}s")


def _show_experts(x: dict) -> None:
    click.echo(f"experts    {x['num_experts']} per MoE layer ({x['layers']} layers), top-{x['top_k']}, intermediate "
               f"{x['intermediate_size']}; {x['mode']}")
    for r in x["per_rank"]:
        a, b = r["experts"]
        holds = f"experts {a}..{b - 1} whole" if x["mode"] == "expert parallel" else f"a slice of experts {a}..{b - 1}"
        click.echo(f"  rank{r['rank']:<4} {holds}, {r['expert_bytes'] / 1e6:.2f} MB of expert weights")


@main.command("inspect")
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@_exits()
def inspect_cmd(workspace: Path, as_json: bool) -> None:
    """Model, tp, bytes per rank (balance), dtypes and source of a workspace."""
    info = inspect_ws(workspace)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    m = info["model"]
    click.echo(f"workspace  {info['workspace']}")
    click.echo(f"model      {m['architecture']}: {m['num_layers']} layers, hidden {m['hidden_size']}, "
               f"{m['num_heads']} heads / {m['num_kv_heads']} KV heads, vocab {m['vocab_size']} "
               f"(padded {info['padded_vocab_size']}), tied embeddings: {m['tie_word_embeddings']}")
    click.echo(f"weights    {info['dtype']}, tp={info['tp']}, pp={info['pp']} ({len(info['bytes_per_rank'])} ranks)")
    if (q := info["quantization"]) and "block_k" in q:
        block = "x".join(map(str, q["source_block"])) + " " if q["strategy"] == "block" else ""
        click.echo(f"quantized  {q['layout']} from {q['source_format']}: float8_e4m3fn weights, {q['strategy']} "
                   f"{block}scales as float32 per row and {q['block_k']} input columns, activation scales "
                   f"{q['activations']} (unused: W8A16)")
    elif q:
        click.echo(f"quantized  {q['layout']} from {q['source_format']}: group {q['group_size']}, {q['scale_dtype']} scales"
                   f"{', zero points' if q['zero_point'] else ', symmetric'}{', act-order' if q['act_order'] else ''}")
    if info["head_padding"]:
        c = info["head_padding"]
        click.echo(f"padding    {c['padded_heads']} heads / {c['padded_kv_heads']} KV heads from the checkpoint's "
                   f"{c['heads']} / {c['kv_heads']} (zero heads, same outputs): +{c['extra_bytes'] / 1e6:.2f} MB of "
                   f"weights over all ranks, +{c['attention_weights_percent']}% attention projection bytes and "
                   f"FLOPs (+{c['layer_weights_percent']}% of a layer's), +{c['kv_cache_percent']}% KV cache per token")
    if info["experts"]:
        _show_experts(info["experts"])
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
