"""The benchmark's plots (matplotlib, PNG): DSC vs shots, gamma sensitivity, DSC vs iteration time, budget curves,
and target DSC against retained source DSC (the trade-off, with its Pareto front).

Each plot is drawn only when the run has its cells; error bars are the summaries' ``dice_std`` (over test cases
for one seed, over the seeds' means for several).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_open
from dgst_monai.protocol.grid import FOUNDATION

__all__ = ["pyplot", "save_png", "write_plots", "write_tradeoff"]


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (a clear error if matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the benchmark's plots need matplotlib: pip install 'dgst-monai[benchmark]'") from None
    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically) and close it."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


def _finals(summary: Sequence[Mapping[str, Any]], method: str, gamma: int | None) -> list[Mapping[str, Any]]:
    return sorted((s for s in summary if s["final"] and s["method"] == method and s["gamma"] == gamma),
                  key=lambda s: s["shots"])


def write_plots(
    out: Path, summary: Sequence[Mapping[str, Any]], *, grid: Mapping[str, Any], table_gamma: int, sparse: set[str]
) -> list[Path]:
    """Write the plots the run's cells allow into ``out``; returns their paths.

    Args:
        out: run folder.
        summary: :func:`dgst_monai.protocol.report.summarize_cells` rows.
        grid: the run's grid (``methods``, ``ablation``, ``gammas``, ``shots``).
        table_gamma: gamma of the sparse methods in the tables.
        sparse: the methods that take a gamma.
    """
    methods = list(dict.fromkeys(m for m in [*grid["methods"], *grid["ablation"]] if m != FOUNDATION))
    lines = {m: _finals(summary, m, table_gamma if m in sparse else None) for m in methods}
    lines = {m: rows for m, rows in lines.items() if rows}
    plots = (_dsc_vs_shots(out, summary, lines), _gamma_sensitivity(out, summary, grid),
             _dsc_vs_iteration_time(out, lines), _budget_curves(out, summary, methods, table_gamma))
    return [p for p in plots if p is not None]


def _dsc_vs_shots(out: Path, summary: Sequence[Mapping[str, Any]], lines: Mapping[str, Sequence[Any]]) -> Path | None:
    if not lines:
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    for rows in lines.values():
        ax.errorbar([r["shots"] for r in rows], [100 * r["dice_mean"] for r in rows],
                    yerr=[100 * r["dice_std"] for r in rows], marker="o", capsize=3, label=rows[0]["label"])
    foundation = [s for s in summary if s["method"] == FOUNDATION]
    if foundation:
        ax.axhline(100 * foundation[0]["dice_mean"], color="grey", linestyle=":", label="Foundation")
    ax.set(xlabel="annotated target cases (shots)", ylabel="DSC (%)", title="DSC vs shots")
    ax.set_xticks(sorted({r["shots"] for rows in lines.values() for r in rows}))
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return save_png(fig, out / "dsc_vs_shots.png")


def _gamma_sensitivity(out: Path, summary: Sequence[Mapping[str, Any]], grid: Mapping[str, Any]) -> Path | None:
    gammas = sorted({s["gamma"] for s in summary if s["method"] == "dgst" and s["final"] and s["gamma"]})
    if not (grid["gammas"] and len(gammas) > 1):
        return None
    fig, ax = pyplot().subplots(figsize=(6.0, 4.0))
    for k in sorted({s["shots"] for s in summary if s["method"] == "dgst"}):
        rows = sorted((s for s in summary if s["method"] == "dgst" and s["final"] and s["shots"] == k),
                      key=lambda s: s["gamma"])
        ax.errorbar([r["gamma"] for r in rows], [100 * r["dice_mean"] for r in rows],
                    yerr=[100 * r["dice_std"] for r in rows], marker="o", capsize=3, label=f"{k} shots")
    ax.set_xscale("log")
    ax.set_xticks(gammas, [str(g) for g in gammas])
    ax.minorticks_off()
    ax.set(xlabel="γ (entries kept per filter)", ylabel="DSC (%)", title="DGST: sensitivity to γ")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(fig, out / "gamma_sensitivity.png")


def _dsc_vs_iteration_time(out: Path, lines: Mapping[str, Sequence[Any]]) -> Path | None:
    timed = [s for m in lines for s in lines[m] if math.isfinite(s["median_s_per_iteration"])]
    if not timed:
        return None
    fig, ax = pyplot().subplots(figsize=(6.5, 4.5))
    shots = sorted({s["shots"] for s in timed})
    markers = "osD^vP*X"
    colours = {m: f"C{i % 10}" for i, m in enumerate(lines)}
    for s in timed:
        ax.scatter(s["median_s_per_iteration"], 100 * s["dice_mean"], color=colours[s["method"]],
                   marker=markers[shots.index(s["shots"]) % len(markers)])
    for m in lines:
        ax.scatter([], [], color=colours[m], marker="o", label=lines[m][0]["label"])
    for i, k in enumerate(shots):
        ax.scatter([], [], color="black", marker=markers[i % len(markers)], label=f"{k} shots")
    ax.set(xlabel="median seconds per training iteration", ylabel="DSC (%)", title="DSC vs iteration time")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return save_png(fig, out / "dsc_vs_iteration_time.png")


def _budget_curves(
    out: Path, summary: Sequence[Mapping[str, Any]], methods: Sequence[str], table_gamma: int
) -> Path | None:
    swept = {(s["method"], s["gamma"]) for s in summary if not s["final"]}
    if not swept:
        return None
    shots = sorted({s["shots"] for s in summary if s["method"] != FOUNDATION})
    fig, axes = pyplot().subplots(1, len(shots), figsize=(5.0 * len(shots), 4.0), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for method, gamma in sorted(swept, key=lambda mg: methods.index(mg[0]) if mg[0] in methods else 99):
            rows = sorted((s for s in summary if s["method"] == method and s["gamma"] == gamma
                           and s["shots"] == k), key=lambda s: s["iteration"])
            if rows:
                label = rows[0]["label"] + (f" γ={gamma}" if gamma not in (None, table_gamma) else "")
                ax.errorbar([r["iteration"] for r in rows], [100 * r["dice_mean"] for r in rows],
                            yerr=[100 * r["dice_std"] for r in rows], marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ticks = sorted({s["iteration"] for s in summary if s["method"] != FOUNDATION})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="fine-tuning iterations", ylabel="DSC (%)", title=f"Budget sweep, {k}-shot")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_png(fig, out / "dsc_vs_iterations.png")


def write_tradeoff(out: Path, points: Sequence[Mapping[str, Any]], reference: Any = None) -> Path:
    """Target DSC against retained source DSC, one panel per shot level, one point per configuration with its
    bootstrap 95 % intervals on both axes; the Pareto front joined by a line (``tradeoff.png``).

    Args:
        out: run folder.
        points: :func:`dgst_monai.protocol.report.tradeoff_points`.
        reference: the reference configuration (drawn with a ring).
    """
    plt = pyplot()
    shots = sorted({p["shots"] for p in points})
    labels = list(dict.fromkeys(p["label"] for p in sorted(points, key=lambda p: p["label"])))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    markers = {label: "osD^vP*Xh<>"[i // 10 % 11] for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(shots), figsize=(5.5 * len(shots), 4.8), squeeze=False)
    for ax, k in zip(axes[0], shots):
        level = [p for p in points if p["shots"] == k]
        for p in level:
            (tm, tl, th), (rm, rl, rh) = p["target"], p["retained"]
            ax.errorbar(100 * rm, 100 * tm, xerr=[[100 * (rm - rl)], [100 * (rh - rm)]],
                        yerr=[[100 * (tm - tl)], [100 * (th - tm)]], fmt=markers[p["label"]],
                        color=colours[p["label"]], capsize=2, ms=6 if p["variant"] != reference else 9,
                        mfc="none" if p["variant"] == reference else colours[p["label"]], label=p["label"])
        front = sorted((p for p in level if p["front"]), key=lambda p: p["retained"][0])
        ax.plot([100 * p["retained"][0] for p in front], [100 * p["target"][0] for p in front], "k--", lw=1,
                label="Pareto front")
        ax.set(xlabel="retained source DSC (%)", ylabel="target DSC (%)", title=f"{k}-shot")
        ax.grid(alpha=0.3)
    handles, names = axes[0][-1].get_legend_handles_labels()
    unique = dict(zip(names, handles))
    fig.legend(unique.values(), unique.keys(), fontsize=7, loc="upper center", ncol=min(4, len(unique)),
               bbox_to_anchor=(0.5, 0.0))
    return save_png(fig, out / "tradeoff.png")
