"""One benchmark cell: fine-tune through the bundle's finetune config, score every checkpoint with its evaluate config.

A cell folder holds ``cell.json`` (what to run, written by the runner) and, once the cell has finished,
``per_case.csv`` and ``result.json`` (written atomically, ``result.json`` last: a cell is finished exactly when
it exists). Everything else lives in ``work/``, which a restarted cell clears first, so a cell killed at any
point is simply run again; ``work/`` is removed at the end unless checkpoints are kept.

Each step is ``monai.bundle.run`` on the bundle's own configs (what a ``python -m monai.bundle run`` user gets)
with overrides and one small overlay, ``work/overlay_*.json``, that adds the benchmark's handlers
(:mod:`dgst_monai.protocol.handlers`): the iteration clock, the budget-sweep checkpoints and the node-level
metrics. The cell runs in a process of its own (``python -m dgst_monai.protocol.cell CELL_DIR``, or a submitit
job calling :func:`run_cell`), so its peak memory is that process's peak RSS.

Example::

    python -m dgst_monai.protocol.cell runs/bench/cells/dgst_5shot_seed0_gamma1
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dgst_monai.files import atomic_open, atomic_write_json, read_json
from dgst_monai.memory import cpu_model, peak_rss_mb
from dgst_monai.protocol.grid import FOUNDATION, Cell, method_label
from dgst_monai.protocol.handlers import CheckpointsAt, write_progress

__all__ = ["CELL_FILE", "RESULT_FILE", "is_finished", "main", "pretrain", "run_cell"]

CELL_FILE, RESULT_FILE, PER_CASE_FILE, PROGRESS_FILE = "cell.json", "result.json", "per_case.csv", "progress.json"
WORK = "work"


def is_finished(cell_dir: str | os.PathLike[str]) -> bool:
    """Whether the cell in ``cell_dir`` has its result."""
    return (Path(cell_dir) / RESULT_FILE).is_file()


def _run_bundle(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any]) -> None:
    """``python -m monai.bundle run`` in this process; ``configs`` are names in the bundle's ``configs/`` or paths."""
    from monai.bundle import run

    folder = Path(bundle) / "configs"
    run(
        config_file=[str(folder / c) if not os.path.isabs(c) else c for c in configs],
        logging_file=str(folder / "logging.conf"),
        bundle_root=str(bundle),
        **overrides,
    )


def _network(bundle: str, configs: Sequence[str], overrides: Mapping[str, Any]) -> Any:
    """The bundle's plain network (``network_def``) under these configs and overrides."""
    from monai.bundle import ConfigParser

    folder = Path(bundle) / "configs"
    parser = ConfigParser()
    parser.read_config([str(folder / c) for c in configs])
    parser.update(pairs={"bundle_root": str(bundle), **overrides})
    return parser.get_parsed_content("network_def")


def _foundation_view(tuned: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any] | None:
    """The foundation entries of a fine-tuned state dict by their foundation names (a spatial-adapter
    checkpoint keeps them under ``foundation.``); None if some are missing."""
    out = {}
    for name in names:
        for key in (name, f"{FOUNDATION}.{name}"):
            if key in tuned:
                out[name] = tuned[key]
                break
        else:
            return None
    return out


def _parameters(protocol: Mapping[str, Any], cell: Cell, tuned_path: Path | None) -> dict[str, Any]:
    """Trainable and actually changed fractions of the foundation network's entries."""
    from dgst_monai.accounting import account_methods
    from dgst_monai.networks.checkpoints import checkpoint_state

    network = _network(protocol["bundle"], protocol["configs"], protocol["overrides"])
    if cell.method == FOUNDATION or tuned_path is None:
        return {"network_entries": sum(p.numel() for p in network.parameters()), "trainable_fraction": 0.0,
                "step_bound_fraction": 0.0, "changed_fraction": 0.0}
    names = [n for n, _ in network.named_parameters()]
    base = checkpoint_state(protocol["foundation"])
    view = _foundation_view(checkpoint_state(tuned_path), names)
    kwargs = {"base_state": base, "tuned_states": {cell.method: view}} if view is not None else {}
    (row,) = account_methods(network, [cell.method], gamma=cell.gamma or 1, steps=protocol["iterations"], **kwargs)
    return {
        "network_entries": row.network_entries,
        "trainable_entries": row.trainable_entries,
        "added_entries": row.added_entries,
        "trainable_fraction": row.trainable_fraction,
        "step_bound_fraction": None if row.step_bound is None else row.step_bound / row.network_entries,
        "steps_bound_fraction": row.steps_fraction,
        "changed_entries": row.changed_entries,
        "changed_fraction": row.changed_fraction,
        "note": row.note or ("" if view is not None else "the checkpoint lacks foundation entries"),
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float:
    return math.nan if text == "" else float(text)


def _evaluate(
    protocol: Mapping[str, Any], checkpoint: Path, out: Path, save_cases: Sequence[str], work: Path
) -> list[dict[str, float | str]]:
    """Score ``checkpoint`` on the test split: per-case DSC, NSD and node metrics."""
    overlay = work / f"overlay_{out.name}.json"
    nodes_csv = out / "node_metrics.csv"
    atomic_write_json(
        overlay,
        {
            "node_metrics": {
                "_target_": "dgst_monai.protocol.handlers.NodeMetricsWriter",
                "csv_path": str(nodes_csv),
                "save_dir": str(work / "qualitative"),
                "save_cases": list(save_cases),
            },
            "evaluator#val_handlers": "$@handlers + [@node_metrics]",
        },
    )
    _run_bundle(
        protocol["bundle"],
        [*protocol["configs"], "evaluate.json", str(overlay)],
        {**protocol["overrides"], "datalist": protocol["datalist"], "checkpoint": str(checkpoint),
         "output_dir": str(out)},
    )
    segmentation = {row["case_id"]: row for row in _read_csv(out / "per_case_metrics.csv")}
    rows: list[dict[str, float | str]] = []
    for node_row in _read_csv(nodes_csv):
        case_id = node_row.pop("case_id")
        seg = segmentation[case_id]
        rows.append(
            {"case_id": case_id, "dice": float(seg["dice"]), "nsd_1mm": float(seg["nsd_1mm"]),
             **{k: _number(v) for k, v in node_row.items()}}
        )
    if len(rows) != len(segmentation):
        raise RuntimeError(f"{out}: {len(segmentation)} cases have DSC / NSD but {len(rows)} have node metrics")
    return rows


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    from dgst_monai.metrics import summarize, summarize_nodes

    return {
        "dice": summarize([float(r["dice"]) for r in rows]),
        "nsd_1mm": summarize([float(r["nsd_1mm"]) for r in rows]),
        "nodes": summarize_nodes([dict(r) for r in rows]),
        "n_cases": len(rows),
    }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def run_cell(cell_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Run the cell described by ``<cell_dir>/cell.json`` from the start and write its result.

    Steps: clear ``work/``; unless the cell is ``foundation``, fine-tune (``finetune.json`` with the cell's
    overrides, the iteration clock and the budget-sweep checkpoints); score each checkpoint (the budget
    iterations, then the final ``model.pt``) with ``evaluate.json`` on the target's test split, and the final
    one also on the protocol's ``source_test`` set (``domain`` ``source`` in ``per_case.csv``); count trainable
    and changed entries; write ``per_case.csv``, then ``result.json``.

    Args:
        cell_dir: the cell's folder.

    Returns:
        The result (also in ``result.json``).

    Raises:
        FileNotFoundError: no ``cell.json``.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    folder = Path(cell_dir)
    spec = read_json(folder / CELL_FILE, "benchmark cell")
    cell, protocol = Cell.from_dict(spec["cell"]), spec["protocol"]
    work = folder / WORK
    shutil.rmtree(work, ignore_errors=True)  # a killed attempt leaves partial files: start over
    (folder / RESULT_FILE).unlink(missing_ok=True)
    work.mkdir(parents=True)
    progress = folder / PROGRESS_FILE
    total = 0 if cell.method == FOUNDATION else int(protocol["iterations"])
    write_progress(progress, phase="train", iteration=0, total=total)

    t0 = time.perf_counter()
    checkpoints, timing = _finetune(cell, protocol, work, progress, total)
    train_wall, peak_train = time.perf_counter() - t0, peak_rss_mb()
    t0 = time.perf_counter()
    per_case, evaluations = _score(protocol, checkpoints, work, progress, total)
    eval_wall = time.perf_counter() - t0
    parameters = _parameters(protocol, cell, None if cell.method == FOUNDATION else checkpoints[-1][1])

    qualitative = folder / "qualitative"
    shutil.rmtree(qualitative, ignore_errors=True)
    if (work / "qualitative").is_dir():
        shutil.copytree(work / "qualitative", qualitative)
    _write_per_case(folder / PER_CASE_FILE, cell, per_case)
    result = {
        "cell": cell.as_dict(),
        "id": cell.id,
        "label": method_label(cell.method),
        "iterations": total,
        **evaluations,
        "timing": {
            "median_s_per_iteration": _median(timing["seconds"]),
            "median_cpu_s_per_iteration": _median(timing["cpu_seconds"]),
            "iterations_timed": len(timing["seconds"]),
            "train_wall_s": train_wall,
            "eval_wall_s": eval_wall,
            "cell_wall_s": time.perf_counter() - started,
            "cell_cpu_s": time.process_time() - cpu_started,
        },
        "parameters": parameters,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_train": peak_train,
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not protocol.get("keep_checkpoints", False):
        shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(folder / RESULT_FILE, _finite(result))
    write_progress(progress, phase="done", iteration=total, total=total)
    return result


def _finetune(
    cell: Cell, protocol: Mapping[str, Any], work: Path, progress: Path, total: int
) -> tuple[list[tuple[int, Path]], dict[str, list[float]]]:
    """Fine-tune the cell's method; returns the checkpoints to score ``[(iteration, path)]`` (the final one last)
    and the iteration clock's timings. The foundation cell scores the foundation checkpoint itself."""
    if cell.method == FOUNDATION:
        return [(0, Path(protocol["foundation"]))], {"seconds": [], "cpu_seconds": []}
    ckpt_dir = work / "models"
    eval_at = [int(i) for i in protocol["eval_at"] if int(i) < total]
    handlers: list[dict[str, Any]] = [
        {
            "_target_": "dgst_monai.protocol.handlers.IterationClock",
            "timing_path": str(work / "timing.json"),
            "progress_path": str(progress),
        }
    ]
    if eval_at:
        handlers.append(
            {
                "_target_": "dgst_monai.protocol.handlers.CheckpointsAt",
                "save_dir": "@ckpt_dir",
                "model": "@final_model",
                "iterations": eval_at,
            }
        )
    overlay = work / "overlay_finetune.json"
    atomic_write_json(overlay, {"+train#handlers": handlers})
    _run_bundle(
        protocol["bundle"],
        [*protocol["configs"], "finetune.json", str(overlay)],
        {
            **protocol["overrides"],
            **cell.overrides(),
            "datalist": protocol["datalist"],
            "foundation_checkpoint": protocol["foundation"],
            "ckpt_dir": str(ckpt_dir),
        },
    )
    checkpoints = [(i, CheckpointsAt.path(ckpt_dir, i)) for i in eval_at] + [(total, ckpt_dir / "model.pt")]
    return checkpoints, read_json(work / "timing.json", "iteration timing")


def _score(
    protocol: Mapping[str, Any], checkpoints: Sequence[tuple[int, Path]], work: Path, progress: Path, total: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every checkpoint on the target's test split and the final one on the source test set (if any).

    Returns:
        The per-case rows (``iteration``, ``domain`` and the metrics) and the result's summaries:
        ``{"evaluations": {iteration: summary}}`` plus ``"source_retained"`` (the final checkpoint's summary on
        the source test set) when the protocol has one.
    """
    source_test = protocol.get("source_test")
    runs = [(i, c, "target") for i, c in checkpoints]
    if source_test:
        runs.append((*checkpoints[-1], "source"))
    per_case: list[dict[str, Any]] = []
    summaries: dict[str, Any] = {"evaluations": {}}
    for n, (iteration, checkpoint, domain) in enumerate(runs):
        write_progress(progress, phase=f"evaluating {n + 1}/{len(runs)}", iteration=total, total=total)
        final_target = domain == "target" and n == len(checkpoints) - 1
        if domain == "target":
            rows = _evaluate(protocol, checkpoint, work / f"eval_it{iteration}",
                             protocol["save_cases"] if final_target else (), work)
            summaries["evaluations"][str(iteration)] = _summary(rows)
        else:
            rows = _evaluate({**protocol, "datalist": source_test}, checkpoint, work / "eval_source", (), work)
            summaries["source_retained"] = _summary(rows)
        per_case += [{"iteration": iteration, "domain": domain, **r} for r in rows]
    return per_case, summaries


def _write_per_case(path: Path, cell: Cell, per_case: Sequence[Mapping[str, Any]]) -> None:
    columns = ["cell", *cell.as_dict(), "iteration", "domain",
               *[k for k in per_case[0] if k not in ("iteration", "domain")]]
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in per_case:
            values = {"cell": cell.id, **cell.as_dict(), **row}
            writer.writerow(["" if values[c] is None else _field(values[c]) for c in columns])


def _field(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _finite(value: Any) -> Any:
    """JSON without NaN: undefined ratios (no node to detect) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def pretrain(folder: str | os.PathLike[str]) -> Path:
    """Pre-train the foundation model described by ``<folder>/pretrain.json`` with the bundle's train config.

    ``pretrain.json`` holds ``bundle``, ``configs``, ``overrides`` (datalist, preset, schedule); the model is
    written to ``<folder>/model.pt`` with its ``normalization.json``, then ``<folder>/done.json``. A killed
    pre-training starts over.

    Returns:
        The path of ``model.pt``.
    """
    root = Path(folder)
    spec = read_json(root / "pretrain.json", "foundation pre-training")
    (root / "done.json").unlink(missing_ok=True)
    overlay = root / "overlay_pretrain.json"
    progress = root / PROGRESS_FILE
    write_progress(progress, phase="pre-training", iteration=0, total=int(spec["iterations"]))
    atomic_write_json(
        overlay,
        {
            "+train#handlers": [
                {
                    "_target_": "dgst_monai.protocol.handlers.IterationClock",
                    "timing_path": str(root / "timing.json"),
                    "progress_path": str(progress),
                }
            ]
        },
    )
    t0 = time.perf_counter()
    _run_bundle(spec["bundle"], [*spec["configs"], str(overlay)], {**spec["overrides"], "ckpt_dir": str(root)})
    atomic_write_json(root / "done.json", {"wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()})
    return root / "model.pt"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dgst_monai.protocol.cell CELL_DIR`` or ``... --pretrain FOLDER``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--pretrain":
        pretrain(args[1])
    elif len(args) == 1 and not args[0].startswith("-"):
        run_cell(args[0])
    else:
        raise SystemExit("usage: python -m dgst_monai.protocol.cell CELL_DIR | --pretrain FOLDER")


if __name__ == "__main__":
    main()
