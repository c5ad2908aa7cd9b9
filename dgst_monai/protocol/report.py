"""The benchmark's outputs: merged per-case CSV, summary CSV, ``report.md`` in the paper's layout, plots, figure.

:func:`write_report` reads whatever cells of a run folder have finished (``cells/*/result.json``), so it works
on a run in progress, a killed one, or one whose cells ran on a cluster (``dgst-monai benchmark report DIR``).

Summaries group the cells of one method, shot level and gamma over their seeds, at each scored iteration:
DSC and NSD are the mean of the per-seed means, with the standard deviation over test cases (one seed, the
paper's "mean +- std") or over the seeds' means (several seeds); node-level detection is pooled over every
case of every seed (:func:`dgst_monai.metrics.summarize_nodes`). Tables mark, per shot level (column), the best
value in bold and the second underlined (``<ins>``), comparing the values as printed.

Example::

    from dgst_monai.protocol.report import write_report
    write_report("runs/bench")  # runs/bench/report.md
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_open, atomic_write, read_json
from dgst_monai.metrics import summarize_nodes
from dgst_monai.protocol.cell import PER_CASE_FILE, RESULT_FILE
from dgst_monai.protocol.grid import FOUNDATION, format_lr, method_label

__all__ = [
    "format_table", "load_results", "paired_table", "rank_marks", "summarize_cells", "tradeoff_points",
    "variant_label", "write_report",
]

#: Summary columns of the node-level metrics (pooled over cases and seeds).
NODE_COLUMNS = (
    "node_recall", "node_recall_lt10", "node_recall_ge10", "node_precision", "node_f1", "node_f1_ge10",
    "fp_per_volume", "abs_volume_error_ml", "rel_volume_error",
)


def load_results(out: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The finished cells of a run folder: their ``result.json`` and their per-case rows (CSV strings)."""
    results, rows = [], []
    for folder in sorted((Path(out) / "cells").glob("*")):
        if not (folder / RESULT_FILE).is_file():
            continue
        results.append(read_json(folder / RESULT_FILE, "cell result"))
        with open(folder / PER_CASE_FILE, newline="", encoding="utf-8") as f:
            rows += list(csv.DictReader(f))
    return results, rows


def _float(text: Any) -> float:
    return math.nan if text in ("", None) else float(text)


def summarize_cells(
    results: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, str]], order: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One summary row per (method, shots, gamma, iteration): metrics over cases and seeds, and the cells' costs.

    Rows come foundation first, then by the method order ``order`` (others after, by name), shots, gamma and
    iteration.

    Columns: ``method, label, shots, gamma, iteration, final, n_seeds, n_cases``; per metric ``m`` in dice and
    nsd_1mm ``m_mean`` (mean of the seeds' means), ``m_std_cases`` (std over all cases, ddof 0) and
    ``m_std_seeds`` (std of the seeds' means, ddof 0; NaN for one seed), ``m_std`` (the one the tables show);
    the pooled node metrics (:data:`NODE_COLUMNS`); and, over the seeds' cells, ``median_s_per_iteration``,
    ``median_cpu_s_per_iteration``, ``trainable_fraction``, ``step_bound_fraction`` (most entries one step can
    change), ``changed_fraction``, ``peak_rss_mb``, ``cell_wall_s``.
    """
    by_cell = {r["id"]: r for r in results}
    groups: dict[tuple[Variant, int, int, str], list[Mapping[str, str]]] = {}
    for row in rows:
        key = (variant_of(row), int(row["shots"]), int(row["iteration"]), row.get("domain") or "target")
        groups.setdefault(key, []).append(row)
    out = []
    for ((method, gamma, update, lr), shots, iteration, domain), group in groups.items():
        cells = sorted({r["cell"] for r in group})
        info = [by_cell[c] for c in cells]
        summary: dict[str, Any] = {
            "method": method,
            "label": method_label(method),
            "shots": shots,
            "gamma": gamma,
            "update": update,
            "lr": lr,
            "domain": domain,
            "iteration": iteration,
            "final": iteration == info[0]["iterations"],
            "n_seeds": len(cells),
            "n_cases": len(group),
        }
        for metric in ("dice", "nsd_1mm"):
            values = [float(r[metric]) for r in group]
            seed_means = [statistics.fmean(float(r[metric]) for r in group if r["cell"] == c) for c in cells]
            summary[f"{metric}_mean"] = statistics.fmean(seed_means)
            summary[f"{metric}_std_cases"] = statistics.pstdev(values)
            summary[f"{metric}_std_seeds"] = statistics.pstdev(seed_means) if len(cells) > 1 else math.nan
            summary[f"{metric}_std"] = summary[f"{metric}_std_seeds" if len(cells) > 1 else f"{metric}_std_cases"]
        nodes = summarize_nodes([{k: _float(v) for k, v in r.items() if k not in ("cell", "method", "case_id", "domain", "update", "lr")}
                                 for r in group])
        summary.update({k: nodes[k] for k in NODE_COLUMNS})
        for key in ("median_s_per_iteration", "median_cpu_s_per_iteration", "cell_wall_s"):
            values = [c["timing"][key] for c in info if c["timing"].get(key) is not None]
            summary[key] = statistics.median(values) if values else math.nan
        for key in ("trainable_fraction", "step_bound_fraction", "changed_fraction"):
            values = [c["parameters"][key] for c in info if c["parameters"].get(key) is not None]
            summary[key] = statistics.fmean(values) if values else math.nan
        summary["peak_rss_mb"] = max(c["peak_rss_mb"] for c in info)
        out.append(summary)
    rank = {m: i for i, m in enumerate([FOUNDATION, *order])}
    out.sort(key=lambda s: (rank.get(s["method"], len(rank)), s["method"], s["shots"], s["gamma"] or 0,
                            s["update"] or "", s["lr"] or 0.0, s["domain"] != "target", s["iteration"]))
    return out


#: A fine-tuning configuration of the grid apart from shots and seed: ``(method, gamma, update, lr)``; update and
#: lr are None at the bundle's defaults.
Variant = tuple[str, Any, Any, Any]


def variant_of(row: Mapping[str, Any]) -> Variant:
    """The :data:`Variant` of a per-case row (columns written before ``update`` / ``lr`` existed read as defaults)."""
    gamma, update, lr = row.get("gamma") or None, row.get("update") or None, row.get("lr") or None
    return (row["method"], None if gamma is None else int(gamma), update, None if lr is None else float(lr))


def variant_label(variant: Variant) -> str:
    """A variant's name in tables and figures: the method's label with its gamma, update mode and learning rate."""
    method, gamma, update, lr = variant
    parts = [method_label(method), f"γ={gamma}" if gamma is not None else "", update or "",
             f"lr {format_lr(lr)}" if lr is not None else ""]
    return " ".join(p for p in parts if p)


def rank_marks(values: Sequence[float | None], higher_is_better: bool = True, digits: int = 2) -> list[str]:
    """``"best"``, ``"second"`` or ``""`` per value, comparing the values rounded to ``digits`` (as printed).

    Ties share their rank (two equal best values are both bold, and the next value is second); None or NaN
    values are not ranked.

    Example:
        >>> rank_marks([0.61, 0.70, 0.65])
        ['', 'best', 'second']
    """
    shown = [None if v is None or not math.isfinite(v) else round(v, digits) for v in values]
    distinct = sorted({v for v in shown if v is not None}, reverse=higher_is_better)
    rank = {v: "best" if i == 0 else "second" if i == 1 else "" for i, v in enumerate(distinct)}
    return ["" if v is None else rank[v] for v in shown]


def _mark(text: str, mark: str) -> str:
    return f"**{text}**" if mark == "best" else f"<ins>{text}</ins>" if mark == "second" else text


def format_table(
    header: Sequence[str],
    rows: Sequence[tuple[str, Sequence[tuple[float | None, float | None]]]],
    *,
    scale: float | Sequence[float] = 100.0,
    digits: int | Sequence[int] = 2,
    ranked: Sequence[bool] | None = None,
    higher_is_better: bool = True,
) -> str:
    """A Markdown table: a name column, then ``mean +- std`` cells; per ranked column best bold, second underlined.

    Args:
        header: column titles (the first is the name column's).
        rows: ``(name, [(mean, std), ...])``; a mean of None or NaN prints as an empty cell, a std of None or NaN
            is left out.
        scale: factor for printing (100: fractions as %), one for all value columns or one per column.
        digits: decimals printed (and compared), one for all or one per column.
        ranked: which value columns to mark (default: all).
        higher_is_better: whether the best is the largest.

    Example:
        >>> print(format_table(["method", "5-shot"], [("Full", [(0.6, 0.1)]), ("DGST", [(0.7, 0.05)])]))
        | method | 5-shot |
        |---|---|
        | Full | <ins>60.00</ins> ± 10.00 |
        | DGST | **70.00** ± 5.00 |
    """
    n_cols = len(header) - 1
    scales = [float(scale)] * n_cols if isinstance(scale, (int, float)) else [float(v) for v in scale]
    decimals = [int(digits)] * n_cols if isinstance(digits, int) else [int(v) for v in digits]
    ranked = [True] * n_cols if ranked is None else list(ranked)
    if not len(scales) == len(decimals) == len(ranked) == n_cols or any(len(r[1]) != n_cols for r in rows):
        raise ValueError(f"format_table: {n_cols} value columns in the header, but rows, scales or digits differ")
    marks = [
        rank_marks([None if r[1][c][0] is None else r[1][c][0] * scales[c] for r in rows], higher_is_better,
                   decimals[c])
        if ranked[c] else [""] * len(rows)
        for c in range(n_cols)
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (name, cells) in enumerate(rows):
        texts = []
        for c, (mean, std) in enumerate(cells):
            if mean is None or not math.isfinite(mean):
                texts.append("")
                continue
            text = _mark(f"{mean * scales[c]:.{decimals[c]}f}", marks[c][i])
            if std is not None and math.isfinite(std):
                text += f" ± {std * scales[c]:.{decimals[c]}f}"
            texts.append(text)
        lines.append("| " + " | ".join([name, *texts]) + " |")
    return "\n".join(lines)


def _lookup(summary: Sequence[Mapping[str, Any]]) -> Callable[..., Mapping[str, Any] | None]:
    index = {(s["method"], s["shots"], s["gamma"], s["iteration"]): s for s in summary}
    finals = {(s["method"], s["shots"], s["gamma"]): s for s in summary if s["final"]}

    def get(method: str, shots: int, gamma: int | None, iteration: int | None = None) -> Mapping[str, Any] | None:
        if iteration is None:
            return finals.get((method, shots, gamma))
        return index.get((method, shots, gamma, iteration))

    return get


def _table_gamma(method: str, table_gamma: int, sparse: set[str]) -> int | None:
    return table_gamma if method in sparse else None


def _final_scores(
    rows: Sequence[Mapping[str, str]], metric: str = "dice", domain: str = "target"
) -> dict[tuple[Variant, int], dict[tuple[int, str], float]]:
    """``{(variant, shots): {(seed, case id): score}}`` of every cell's final checkpoint on ``domain``'s cases."""
    final: dict[str, int] = {}
    for r in rows:
        final[r["cell"]] = max(final.get(r["cell"], 0), int(r["iteration"]))
    scores: dict[tuple[Variant, int], dict[tuple[int, str], float]] = {}
    for r in rows:
        if int(r["iteration"]) == final[r["cell"]] and (r.get("domain") or "target") == domain:
            key = (variant_of(r), int(r["shots"]))
            scores.setdefault(key, {})[(int(r["seed"]), r["case_id"])] = _float(r[metric])
    return scores


def _level_scores(
    rows: Sequence[Mapping[str, str]], metric: str, domain: str
) -> dict[tuple[Variant, int], dict[tuple[int, str], float]]:
    """:func:`_final_scores` with the foundation (shots 0) placed at every shot level: it is a configuration of
    each (the one that does not fine-tune). The foundation is one model whatever the seed, so its score of a case
    stands for every seed of that level, and a paired difference against it uses all the level's pairs."""
    scores = _final_scores(rows, metric, domain)
    levels = sorted({k for _, k in scores if k > 0})
    for key in [key for key in scores if key[1] == 0 and levels]:
        per_case = {case: score for (_, case), score in scores.pop(key).items()}
        for k in levels:
            seeds = {seed for (_, shots), cases in scores.items() if shots == k for seed, _ in cases}
            scores[(key[0], k)] = {(seed, case): score for seed in seeds for case, score in per_case.items()}
    return scores


def _difference_text(ours: Mapping[tuple[int, str], float] | None,
                     theirs: Mapping[tuple[int, str], float] | None) -> str:
    """``mean [low, high], p, n`` of a paired difference in percentage points, marked where it excludes 0."""
    from dgst_monai.protocol.statistics import paired_difference

    diff = paired_difference(ours, theirs) if ours and theirs else None
    if diff is None:
        return ""
    text = f"{diff.mean * 100:+.2f} [{diff.low * 100:+.2f}, {diff.high * 100:+.2f}], p {diff.p_value:.2g}, n {diff.pairs}"
    if diff.significant:
        text = f"**{text}**" if diff.mean > 0 else f"<ins>{text}</ins>"
    return text


def paired_table(
    rows: Sequence[Mapping[str, str]],
    methods: Sequence[str | Variant],
    reference: str | Variant,
    shots: Sequence[int],
    gamma_of: Callable[[str], int | None],
    metric: str = "dice",
    domain: str = "target",
) -> str | None:
    """Markdown table of each method's paired difference against ``reference`` per shot level (percentage points,
    bootstrap 95 % interval over seeds and test cases, Wilcoxon p); None when the reference has no cell.

    ``methods`` and ``reference`` are method names (at their table gamma, ``gamma_of``, and the bundle's update
    mode and learning rate) or :data:`Variant` tuples; ``domain`` ``source`` compares the retained source scores.
    **bold**: the interval lies above 0 (better than the reference); <ins>underlined</ins>: below 0 (worse).
    """
    def variant(m: str | Variant) -> Variant:
        return (m, gamma_of(m), None, None) if isinstance(m, str) else tuple(m)  # type: ignore[return-value]

    scores = _level_scores(rows, metric, domain)
    ref = variant(reference)
    if not any(scores.get((ref, k)) for k in shots):
        return None
    header = ["Method", *[f"{k}-shot" for k in shots]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        v = variant(m)
        if v == ref:
            continue
        cells = [_difference_text(scores.get((v, k)), scores.get((ref, k))) for k in shots]
        if any(cells):
            name = method_label(v[0]) if isinstance(m, str) else variant_label(v)
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def tradeoff_points(rows: Sequence[Mapping[str, str]], metric: str = "dice") -> list[dict[str, Any]]:
    """Every variant and shot level scored on both the target and the source test set: target and retained means
    with bootstrap 95 % intervals (seeds and cases resampled), and whether it lies on the Pareto front of its
    shot level (no other point is at least as good on both and better on one).

    Returns:
        ``[{"variant", "label", "shots", "seeds", "target": (mean, low, high), "retained": (mean, low, high),
        "front"}]``; ``seeds`` lists the seeds of the target scores (empty for the foundation, which has none).
    """
    from dgst_monai.protocol.statistics import mean_interval

    target, source = _level_scores(rows, metric, "target"), _level_scores(rows, metric, "source")
    points = []
    for key in target.keys() & source.keys():
        t, r = mean_interval(target[key]), mean_interval(source[key])
        if t is not None and r is not None:
            seeds = [] if key[0][0] == FOUNDATION else sorted({seed for seed, _ in target[key]})
            points.append({"variant": key[0], "label": variant_label(key[0]), "shots": key[1], "seeds": seeds,
                           "target": t, "retained": r})
    for p in points:
        p["front"] = not any(
            q["shots"] == p["shots"] and q is not p and q["target"][0] >= p["target"][0]
            and q["retained"][0] >= p["retained"][0]
            and (q["target"][0] > p["target"][0] or q["retained"][0] > p["retained"][0])
            for q in points
        )
    return sorted(points, key=lambda p: (p["shots"], -p["target"][0]))


class _Report:
    """What the report's sections share: the run's state, summaries and the tables' method lists."""

    def __init__(self, out: Path, reference: str) -> None:
        self.state = read_json(out / "benchmark.json", "benchmark state")
        self.results, self.rows = load_results(out)
        if not self.results:
            raise ValueError(f"{out}: no finished cell yet (cells/*/result.json): nothing to report")
        self.grid, self.protocol = self.state["grid"], self.state["protocol"]
        self.reference = reference
        self.all = summarize_cells(self.results, self.rows, order=[*self.grid["methods"], *self.grid["ablation"]])
        defaults = [s for s in self.all if s["update"] is None and s["lr"] is None]
        self.summary = [s for s in defaults if s["domain"] == "target"]
        self.get = _lookup(self.summary)
        self.get_source = _lookup([s for s in defaults if s["domain"] == "source"])
        self.shots = sorted({int(k) for k in self.grid["shots"]})
        self.sparse = {r["cell"]["method"] for r in self.results if r["cell"].get("gamma") is not None}
        self.defaults = read_json(Path(self.protocol["bundle"]) / "configs" / "finetune.json", "finetune config")
        self.table_gamma = int(self.defaults["gamma"])
        has = self.has
        self.methods = [m for m in self.grid["methods"] if has(m)]
        self.ablation = [m for m in dict.fromkeys(["full", *self.grid["ablation"], "dgst"])
                         if self.grid["ablation"] and has(m)]
        self.retained = any(s["domain"] == "source" for s in self.all)

    def gamma(self, method: str) -> int | None:
        return _table_gamma(method, self.table_gamma, self.sparse)

    def has(self, method: str) -> bool:
        return any(self.get(method, k, self.gamma(method)) for k in self.shots)

    def metric_rows(self, names: Sequence[str], key: str, std: bool = True) -> list[tuple[str, list[Any]]]:
        """Per method, per shot level the (mean, std) of ``key``, then (with a source test set) the retained."""
        table = []
        for m in names:
            lookups = [self.get, self.get_source] if self.retained and std else [self.get]
            cells = []
            for get in lookups:
                for k in self.shots:
                    s = get(m, k, self.gamma(m))
                    cells.append((None, None) if s is None else (s[f"{key}_mean" if std else key],
                                                                 s[f"{key}_std"] if std else None))
            table.append((method_label(m), cells))
        return table

    def header(self, std: bool = True) -> list[str]:
        shots = [f"{k}-shot" for k in self.shots]
        return ["Method", *shots, *([f"retained {k}-shot" for k in self.shots] if self.retained and std else [])]

    def foundation_note(self, key: str, std: bool = True, scale: float = 100.0) -> str:
        parts = []
        for name, get in (("", self.get), ("; retained (source test set)", self.get_source)):
            found = get(FOUNDATION, 0, None)
            value = None if found is None else found[f"{key}_mean" if std else key]
            if value is None or not math.isfinite(value) or (name and not std):
                continue
            tail = f" ± {found[f'{key}_std'] * scale:.2f}" if std else ""
            parts.append(f"{name}{' ' if name else ''}{value * scale:.2f}{tail}".lstrip("; "))
        return f"\nFoundation model without fine-tuning: {'; '.join(parts)}.\n" if parts else ""


def write_report(out: str | os.PathLike[str], reference: str = "full") -> Path:
    """Write ``per_case.csv``, ``summary.csv``, ``report.md``, the plots and the qualitative figure of a run.

    Args:
        out: the run folder (``benchmark.json`` and ``cells/``).
        reference: the method every other is compared with, pair by pair (``paired_table``).

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: ``out`` has no ``benchmark.json``.
        ValueError: no cell has finished yet.
    """
    from dgst_monai.protocol import figure, plots

    out = Path(out)
    report = _Report(out, reference)
    _write_csv(out / "per_case.csv", report.rows)
    _write_csv(out / "summary.csv", report.all)
    lines = [*_intro(report), *_table1(report), *_ablation(report), *_gamma_sweep(report), *_budget(report),
             *_paired(report), *_tradeoff(report), "## Cost per cell", "", _cost_table(report.all), ""]
    figures = plots.write_plots(out, report.summary, grid=report.grid, table_gamma=report.table_gamma,
                                sparse=report.sparse)
    points = tradeoff_points(report.rows)
    if points:
        figures.append(plots.write_tradeoff(out, points, reference=_reference_variant(report)))
    qualitative = figure.write_qualitative(out, report.state, table_gamma=report.table_gamma, sparse=report.sparse)
    if qualitative is not None or (out / "qualitative.png").is_file():  # kept if the images moved away since
        figures.append(out / "qualitative.png")
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    lines += ["Files: per_case.csv (every case of every cell and scored iteration), summary.csv (the groups above).",
              ""]
    return atomic_write(out / "report.md", "\n".join(lines))


def _intro(r: _Report) -> list[str]:
    schedule, protocol, grid = r.state["schedule"], r.protocol, r.grid
    n_test = max(s["n_cases"] // s["n_seeds"] for s in r.summary) if r.summary else 0
    spread = "std over the seeds' means" if len(grid["seeds"]) > 1 else "std over test cases"
    lines = [
        "# Benchmark report",
        "",
        f"- Target: {r.state['target']}; split: splits.json ({n_test} test cases).",
        f"- Preset `{r.state['preset']}`; every method {schedule['max_epochs']} epochs x "
        f"{schedule['iterations_per_epoch']} iterations = {protocol['iterations']} iterations from the same "
        f"foundation checkpoint (sha256 {protocol['foundation_sha256'][:12]}); the final checkpoint is scored.",
        f"- Seeds: {', '.join(map(str, grid['seeds']))}; values are mean ± {spread}, in %.",
        f"- Cells finished: {len(r.results)}. Executor: {r.state['executor']}, threads per cell: "
        f"{r.state.get('threads') or 'torch default'}."
        + (f" Command: `{r.state['command']}`" if r.state.get("command") else ""),
        "- Per shot level, the best value is **bold** and the second <ins>underlined</ins>.",
    ]
    if r.results:
        lines.append(_cost_line(r.results))
    if r.retained:
        lines.append(f"- Retained: the same final checkpoints scored on the held-out source-domain test set "
                     f"({protocol.get('source_test')}): what fine-tuning keeps of the foundation's knowledge.")
    return [*lines, ""]


def _cost_line(results: Sequence[Mapping[str, Any]]) -> str:
    """What the finished cells cost, summed, and the CPUs they ran on (results differ in rounding across models)."""
    wall = sum(float(x.get("timing", {}).get("cell_wall_s", 0.0)) for x in results)
    cpu = sum(float(x.get("timing", {}).get("cell_cpu_s", 0.0)) for x in results)
    models = Counter(x.get("cpu", "not recorded") for x in results)
    where = ", ".join(f"{name} ({n})" for name, n in models.most_common())
    return (f"- Cost of the finished cells: {wall / 3600:.1f} h of cell wall time, {cpu / 3600:.1f} h of CPU time "
            f"(the foundation's pre-training not included); cells per CPU model: {where}.")


def _table1(r: _Report) -> list[str]:
    if not r.methods:
        return []
    lines = ["## Table 1: DSC (%)", "", format_table(r.header(), r.metric_rows(r.methods, "dice")),
             r.foundation_note("dice"),
             "## NSD at 1 mm (%)", "", format_table(r.header(), r.metric_rows(r.methods, "nsd_1mm")),
             r.foundation_note("nsd_1mm"),
             "## Lymph-node detection (pooled over the test cases' nodes)", ""]
    for key, title, higher in (
        ("node_f1", "Node F1 (%)", True),
        ("node_recall_ge10", "Recall of nodes >= 10 mm short axis (%)", True),
        ("node_recall_lt10", "Recall of nodes < 10 mm short axis (%)", True),
        ("node_precision", "Node precision (%)", True),
        ("fp_per_volume", "False-positive components per volume", False),
        ("rel_volume_error", "Relative volume error |V_pred - V_ref| / V_ref (%)", False),
    ):
        scale = 1.0 if key == "fp_per_volume" else 100.0
        table = r.metric_rows(r.methods, key, std=False)
        if not any(mean is not None and math.isfinite(mean) for _, cells in table for mean, _ in cells):
            continue  # e.g. no reference node of that size in the test split
        lines += [f"### {title}", "",
                  format_table(r.header(std=False), table, scale=scale, higher_is_better=higher),
                  r.foundation_note(key, std=False, scale=scale)]
    return lines


def _ablation(r: _Report) -> list[str]:
    if not r.ablation:
        return []
    header = ["Method", *[f"DSC {k}-shot" for k in r.shots], "s / iteration", "trainable %", "updated / step %",
              "changed %", "peak RSS (GB)"]
    table = []
    for m in r.ablation:
        s_final = [r.get(m, k, r.gamma(m)) for k in r.shots]
        cost = next(s for s in s_final if s is not None)
        table.append((method_label(m), [
            *[(None, None) if s is None else (s["dice_mean"], s["dice_std"]) for s in s_final],
            (cost["median_s_per_iteration"], None), (cost["trainable_fraction"], None),
            (cost["step_bound_fraction"], None), (cost["changed_fraction"], None), (cost["peak_rss_mb"], None),
        ]))
    n = len(r.shots)
    return ["## Table 2: ablation", "",
            format_table(header, table, scale=[100.0] * n + [1.0, 100.0, 100.0, 100.0, 1 / 1024],
                         digits=[2] * n + [3, 4, 4, 4, 2], ranked=[True] * n + [False] * 5),
            "", "s / iteration: median wall time of a training iteration (batch loading, step, selection). "
            "Percentages are of the foundation network's entries: trainable (requires_grad, with added "
            "adapter / LoRA entries), the most one step can update, and those that differ after fine-tuning.", ""]


def _gamma_sweep(r: _Report) -> list[str]:
    gammas = sorted({s["gamma"] for s in r.summary if s["method"] == "dgst" and s["gamma"]})
    if not (r.grid["gammas"] and gammas):
        return []
    table = [(f"DGST γ = {g}", [(s["dice_mean"], s["dice_std"]) if (s := r.get("dgst", k, g)) else (None, None)
                                for k in r.shots]) for g in gammas]
    return ["## Gamma sensitivity: DGST DSC (%)", "",
            format_table(["γ", *[f"{k}-shot" for k in r.shots]], table), ""]


def _budget(r: _Report) -> list[str]:
    if not r.protocol["eval_at"]:
        return []
    budgets = sorted({s["iteration"] for s in r.summary if s["method"] != FOUNDATION})
    lines = ["## Budget sweep: DSC (%) after N iterations of the same runs", "",
             "The checkpoints of one run at each iteration count (the learning rate follows the whole run's "
             "poly schedule, so earlier checkpoints are not runs of that length).", ""]
    swept = [m for m in dict.fromkeys(s["method"] for s in r.summary) if m != FOUNDATION]
    for k in r.shots:
        table = []
        for m in swept:
            cells = [(s["dice_mean"], s["dice_std"]) if (s := r.get(m, k, r.gamma(m), it)) else (None, None)
                     for it in budgets]
            if any(c[0] is not None for c in cells):
                table.append((method_label(m), cells))
        lines += [f"### {k}-shot", "", format_table(["Method", *[f"{it} it" for it in budgets]], table), ""]
    return lines


def _paired(r: _Report) -> list[str]:
    compared = [m for m in dict.fromkeys([*r.methods, *r.ablation]) if m != FOUNDATION]
    lines = []
    for domain, what in (("target", "DSC"), ("source", "retained source DSC")):
        paired = paired_table(r.rows, compared, r.reference, r.shots, r.gamma, domain=domain)
        if paired is None:
            continue
        lines += [f"## Paired differences against {method_label(r.reference)}: {what} (percentage points)", "",
                  f"Method minus {method_label(r.reference)} on the same test cases and seeds: mean, bootstrap 95 % "
                  "interval (seeds and test cases resampled), Wilcoxon signed-rank p, number of pairs. **Bold**: "
                  "the interval lies above 0; <ins>underlined</ins>: below 0; unmarked: no difference shown.", "",
                  paired, ""]
    return lines


def _reference_variant(r: _Report) -> Variant:
    return (r.reference, r.gamma(r.reference), None, None)


def _tradeoff(r: _Report) -> list[str]:
    """Every variant's target DSC against its retained source DSC, with paired differences and the Pareto front."""
    points = tradeoff_points(r.rows)
    if not points:
        return []
    ref = _reference_variant(r)
    target, source = _level_scores(r.rows, "dice", "target"), _level_scores(r.rows, "dice", "source")
    lines = ["## Adaptation against forgetting: target DSC and retained source DSC (%)", "",
             "Each configuration (method, γ, update mode, learning rate) at each shot level: mean DSC on the target's "
             "test cases and on the held-out source test set, bootstrap 95 % intervals (seeds and cases "
             f"resampled), and its paired difference against {variant_label(ref)} on both. Front: on the Pareto "
             "front of its shot level (no configuration is at least as good on both and better on one); a method is "
             "better only where it lies above the others' points. A difference in **bold** has its interval above 0, "
             "<ins>underlined</ins> below 0. A label names what differs from the bundle's fine-tuning defaults "
             f"(learning rate {r.defaults['learning_rate']}, update `{r.defaults['update']}`). Seeds: the seeds "
             "finished for the configuration (a paired difference uses the seeds both have).", ""]
    for k in sorted({p["shots"] for p in points}):
        header = ["Configuration", "seeds", "target DSC", "retained DSC", f"target vs {variant_label(ref)}",
                  f"retained vs {variant_label(ref)}", "front"]
        lines += [f"### {k}-shot", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for p in (p for p in points if p["shots"] == k):
            v = p["variant"]
            cells = [p["label"], ", ".join(map(str, p["seeds"])) or "–", _interval_text(p["target"]),
                     _interval_text(p["retained"]),
                     "" if v == ref else _difference_text(target.get((v, k)), target.get((ref, k))),
                     "" if v == ref else _difference_text(source.get((v, k)), source.get((ref, k))),
                     "yes" if p["front"] else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _interval_text(value: tuple[float, float, float]) -> str:
    mean, low, high = value
    return f"{mean * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]"


def _cost_table(summary: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| Method | shots | γ | s / it | CPU s / it | trainable % | updated / step % | changed % | "
             "peak RSS (GB) | cell (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if not s["final"] or s["domain"] != "target":
            continue

        def num(v: float, fmt: str) -> str:
            return "" if v is None or not math.isfinite(v) else format(v, fmt)

        lines.append(
            f"| {variant_label((s['method'], None, s['update'], s['lr']))} | {s['shots'] or ''} | {s['gamma'] or ''} | {num(s['median_s_per_iteration'], '.3f')} | "
            f"{num(s['median_cpu_s_per_iteration'], '.3f')} | {num(100 * s['trainable_fraction'], '.4f')} | "
            f"{num(100 * s['step_bound_fraction'], '.4f')} | {num(100 * s['changed_fraction'], '.4f')} | "
            f"{num(s['peak_rss_mb'] / 1024, '.2f')} | "
            f"{num(s['cell_wall_s'] / 60, '.1f')} |"
        )
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_text(row.get(c)) for c in columns])


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)

