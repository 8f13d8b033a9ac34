"""``tprun plan --png``: the memory plan as one stacked bar per rank (matplotlib, imported only here)."""
from __future__ import annotations

from pathlib import Path

from formats.errors import TpDeployError
from runtime.serve.plan import MemoryPlan
from runtime.worker.memory import GIB

# Weights and reserve are what the model costs; the KV cache is what λ hands out; unused is the rest.
PARTS = (("weights", "#4C72B0"), ("reserve", "#DD8452"), ("KV cache", "#55A868"), ("unused", "#C8C8C8"))


def draw(plan: MemoryPlan, path: Path | str) -> Path:
    """Write a PNG of the plan to ``path`` (always PNG, whatever the suffix) and return the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise TpDeployError(f"cannot write the plan chart to {path}: {path.parent} is not a directory")
    try:
        # The Agg canvas directly, not pyplot: no global backend switch, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise TpDeployError(f"drawing the plan needs matplotlib ({e}); `pip install matplotlib` "
                            "or leave out the PNG option") from e
    fig = Figure(figsize=(max(4.0, 1.2 * len(plan.ranks) + 2.5), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [str(r.rank) for r in plan.ranks]
    columns = [[r.weights, r.reserve, r.kv_allocated, r.unused] for r in plan.ranks]
    bottom = [0.0] * len(xs)
    for i, (label, color) in enumerate(PARTS):
        heights = [c[i] / GIB for c in columns]
        ax.bar(xs, heights, bottom=bottom, label=label, color=color)
        bottom = [b + h for b, h in zip(bottom, heights)]
    lam = f"--kv-cache-tokens {plan.kv_cache_tokens}" if plan.kv_source == "kv_cache_tokens" else f"λ {plan.lam:.2f}"
    ax.set_title(f"{plan.model.architecture}  tp {plan.tp} x pp {plan.pp}  KV {plan.kv_dtype}  {lam}\n"
                 f"{plan.kv_tokens:,} KV tokens, {plan.concurrency:.2f} × {plan.max_model_len}-token requests",
                 fontsize=10)
    ax.set_xlabel("rank")
    ax.set_ylabel("GiB")
    ax.axhline(plan.gpu_mem / GIB, color="black", linewidth=0.8, linestyle="--")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars, never over them
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as e:
        raise TpDeployError(f"cannot write the plan chart to {path}: {e}") from e
    return path
