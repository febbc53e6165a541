"""Reading a `tomesd.bench` run: `BenchResult`, the smallest ratios reaching a target speed-up, the
text table, the plot and the files (results.json, results.csv, bench.png)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..tools import cli

TOY_NOTE = "toy architecture (--arch tiny): its speed-ups are larger than SD 1.5's; run without --arch for real ones"


@dataclass
class BenchResult:
    """rows: one dict per grid point (keys tomesd.bench.measure.ROW_FIELDS); env: versions, device, backend,
    settings; target: target_ratios(...) when the run had a target speedup."""

    rows: List[Dict[str, Any]]
    env: Dict[str, Any] = field(default_factory=dict)
    target: Optional[Dict[str, Any]] = None


def target_ratios(result: BenchResult, target: float) -> Dict[str, Any]:
    """For each setting and resolution of `result`, the smallest measured ratio whose speedup reaches
    `target` (a grid search over the ratios run). Returns {"speedup": target, "settings": [{"params",
    "setting", "ratio": {resolution: ratio}, "not_reached": {resolution: {"best_speedup", "at_ratio"}}}],
    "best": the entry reaching the target at the most resolutions with the smallest ratios, or None
    when no setting reaches it anywhere}. A resolution where no ratio could be measured (OOM, no
    baseline) is in not_reached with best_speedup None."""
    resolutions = list(dict.fromkeys(row["resolution"] for row in result.rows))
    tome = [row for row in result.rows if row["method"] == "tome"]
    entries = []
    for params in [p for i, p in enumerate(r["params"] for r in tome) if p not in [r["params"] for r in tome[:i]]]:
        entry: Dict[str, Any] = dict(params=params, setting=" ".join(filter(None, ("tome", cli.setting_label(params)))),
                                     ratio={}, not_reached={})
        for res in resolutions:
            rows = [r for r in tome if r["params"] == params and r["resolution"] == res and r["speedup"] is not None]
            hits = sorted(r["ratio"] for r in rows if r["speedup"] >= target)
            if hits:
                entry["ratio"][res] = hits[0]
            else:
                best = max(rows, key=lambda r: r["speedup"], default=None)
                entry["not_reached"][res] = dict(best_speedup=best and best["speedup"], at_ratio=best and best["ratio"])
        entries.append(entry)
    reaching = [e for e in entries if e["ratio"]]
    best = min(reaching, key=lambda e: (-len(e["ratio"]), sum(e["ratio"].values()) / len(e["ratio"])), default=None)
    return dict(speedup=target, settings=entries, best=best)


def format_target(target: Dict[str, Any]) -> str:
    """The target_ratios result in words: one mapping per setting, the resolutions it misses, and the
    apply_patch call of the best setting."""
    x = target["speedup"]
    lines = [f"target speedup {x:g}x: smallest ratio of the grid reaching it, per resolution (px):"]
    width = max(len(e["setting"]) for e in target["settings"]) if target["settings"] else 0
    for e in target["settings"]:
        text = f"  {e['setting'].ljust(width)}  {_mapping(e['ratio']) if e['ratio'] else '-'}"
        misses = [f"{res} px (best {cli.fmt(m['best_speedup'], '.2f', 'x')}" + (
            f" at ratio {m['at_ratio']:g})" if m["at_ratio"] is not None else ")") for res, m in e["not_reached"].items()]
        if misses:
            text += f"   not reached at {', '.join(misses)}"
        lines.append(text)
    best = target["best"]
    if best is None:
        lines.append(f"no setting reaches {x:g}x at any resolution: raise --ratios or lower the target")
        return "\n".join(lines)
    kwargs = "".join(f", {k}={v!r}" for k, v in best["params"].items())
    lines.append(f"use: apply_patch(model, ratio={_mapping(best['ratio'])}{kwargs})")
    if best["not_reached"]:
        lines.append(f"  it does not reach {x:g}x at {', '.join(str(r) for r in best['not_reached'])} px, where the "
                     "mapping gives the ratio of its nearest size")
    return "\n".join(lines)


def _mapping(ratios: Dict[int, float]) -> str:
    return "{" + ", ".join(f"{res}: {ratio:g}" for res, ratio in ratios.items()) + "}"


def noisy_rows(result: BenchResult, spread: float = 0.5) -> List[Dict[str, Any]]:
    """Rows whose timed steps differ by more than `spread` × their median: a busy machine."""
    return [row for row in result.rows if row["status"] == "ok" and row.get("ms_max") is not None
            and row["ms_max"] - row["ms_min"] > spread * row["ms_per_step"]]


def format_table(result: BenchResult) -> str:
    """The rows as an aligned text table (under a warning line for a toy architecture); a "calls"
    column (UNet calls per timed window) when some window holds more than one."""
    show_calls = any((row.get("calls") or 1) > 1 for row in result.rows)
    header = ("res px", "method", "ms/step", "speedup", "peak MiB", "mem ratio") + (("calls",) if show_calls else ())
    lines = [header]
    for row in result.rows:
        method = row.get("setting") or ("baseline" if row["method"] == "baseline" else f"tome {row['ratio']:g}")
        calls = (str(row.get("calls") or 1),) if show_calls else ()
        if row["status"] != "ok":
            lines.append((str(row["resolution"]), method, row["status"], "-", "-", "-") + calls)
            continue
        lines.append((
            str(row["resolution"]), method, cli.fmt(row["ms_per_step"], ".1f"), cli.fmt(row["speedup"], ".2f", "x"),
            cli.fmt(row["peak_mem_mib"], ".0f"), cli.fmt(row["mem_ratio"], ".2f"),
        ) + calls)
    out = cli.align(lines, left=(1,))
    if result.env.get("toy"):
        out.insert(0, f"[{TOY_NOTE}]")
    return "\n".join(out)


def plot(result: BenchResult, path: Optional[str] = None):
    """Figure: ms/step and peak memory against resolution, one line per ratio and setting (and the baseline).
    OOM points are left out. Saved as PNG to `path` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_time, ax_mem = fig.subplots(1, 2)
    for label in dict.fromkeys(row["setting"] for row in result.rows):
        rows = [r for r in result.rows if r["setting"] == label and r["status"] == "ok"]
        is_tome = label != "baseline"
        style = dict(marker="o", label=label, linestyle="-" if is_tome else "--", color=None if is_tome else "black")
        ax_time.plot([r["resolution"] for r in rows], [r["ms_per_step"] for r in rows], **style)
        mem = [(r["resolution"], r["peak_mem_mib"]) for r in rows if r["peak_mem_mib"] is not None]
        ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], **style)
    env = result.env
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    ax_mem.set_ylim(bottom=0)  # from zero: a 1% difference stays a 1% difference in height
    ax_time.set_yscale("log")
    ax_time.yaxis.set_major_formatter(ScalarFormatter())
    for ax, ylabel in ((ax_time, "ms per UNet step (median, log scale)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(sorted({row["resolution"] for row in result.rows}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    config = env.get("config", {})
    name = config.get("arch") or config.get("model")
    name = f"{name} (TOY architecture)" if env.get("toy") else name
    fig.suptitle(f"tomesd.bench: {name}, {config.get('dtype')}, {where}")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def write_results(result: BenchResult, out_dir: str, png: Optional[bool] = None, plotter=None) -> Dict[str, str]:
    """Write results.json (rows, environment, and target when the run had one), results.csv (params as
    JSON) and (png; None: when matplotlib is installed) bench.png, drawn by `plotter(result, path)`
    (default: plot, the grid's figure), into out_dir; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    png = cli.available("matplotlib") if png is None else png
    names = ("results.json", "results.csv") + (("bench.png",) if png else ())
    paths = {name: os.path.join(out_dir, name) for name in names}
    data = dict(rows=result.rows, environment=result.env)
    if result.target is not None:
        data["target"] = result.target
    cli.write_json(paths["results.json"], data)
    cli.write_csv(paths["results.csv"], result.rows)
    if png:
        (plotter or plot)(result, paths["bench.png"])
    return paths
