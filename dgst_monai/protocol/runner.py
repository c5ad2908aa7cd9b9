"""``dgst-monai benchmark``: the paper's protocol over a grid of methods x shots x seeds, resumable, local or Slurm.

The protocol, exactly as the paper's: one seeded 8:2 split of the target data (a datalist's own ``test`` list
is kept), nested k-shot subsets of its training part (:func:`dgst_monai.data.datalists.few_shot`), every
method fine-tuned from the same foundation checkpoint with the same schedule through the bundle's
``finetune.json``, the final checkpoint scored on the whole test split by its ``evaluate.json`` (DSC, NSD@1mm,
lymph-node detection per case). The budget sweep (``eval_at``) also scores the checkpoints of chosen
iteration counts of the same runs.

Without a datalist and a foundation checkpoint the synthetic default is used (:mod:`dgst_monai.data.multisite`):
source and target phantoms and a foundation model pre-trained once on the source with the bundle's train
config, all cached in ``cache`` (default ``<out>/cache``), so several runs can share them.

Layout of ``out``::

    benchmark.json          the protocol (checked on every rerun) and the grid
    splits.json             the split and few-shot subsets: the datalist of every cell
    cells/<cell>/           cell.json, result.json, per_case.csv, log.txt, qualitative/ (see protocol.cell)
    per_case.csv, summary.csv, report.md, *.png   (protocol.report)

A rerun skips the cells that have a ``result.json``; a killed run loses only the cells in progress.

Example::

    from dgst_monai.protocol import run_benchmark
    run_benchmark("runs/bench", shots=[5, 10, 20], seeds=[0], methods=["full", "dgst"], preset="cpu_small")
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_write_json, read_json
from dgst_monai.protocol.cell import CELL_FILE, is_finished
from dgst_monai.protocol.executors import Job, Progress, make_executor
from dgst_monai.protocol.grid import FOUNDATION, TABLE1_METHODS, plan_grid

__all__ = ["PRESETS", "SYNTHETIC", "BenchmarkError", "SyntheticDefault", "run_benchmark"]

#: ``--preset``: the bundle configs added after ``train.json`` and the overrides that select the network.
PRESETS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "paper": ((), {}),
    "cpu_small": (("cpu_small.json",), {}),
    "tiny": (("cpu_small.json",), {"preset": "tiny"}),
}


@dataclass(frozen=True)
class SyntheticDefault:
    """Sizes of the synthetic default (None: the data manifest's / the bundle's).

    Attributes:
        source_cases: source (pre-training) cases.
        target_cases: target cases before the 8:2 split.
        knobs: phantom knobs over the manifest's, for every set (e.g. a small field of view).
        pretrain: overrides of the pre-training run (schedule); empty: the preset's own schedule.
    """

    source_cases: int | None = None
    target_cases: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)


#: ``--synthetic``: ``default`` is the manifest's (100 target cases: 20 test cases) with the preset's
#: pre-training schedule; ``tiny`` is the tests' (a few small phantoms, two pre-training iterations).
SYNTHETIC: dict[str, SyntheticDefault] = {
    "default": SyntheticDefault(),
    "tiny": SyntheticDefault(
        source_cases=3,
        target_cases=10,
        knobs={"fov_mm": (64.0, 64.0, 32.0)},
        pretrain={"max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 0, "num_validation": 0},
    ),
}

#: The keys of ``benchmark.json``'s protocol: a rerun into the same folder must agree on all of them.
_PROTOCOL_KEYS = ("bundle", "configs", "overrides", "datalist", "foundation", "foundation_sha256", "iterations",
                  "eval_at", "save_cases")


#: Overrides the runner sets itself for each cell.
_CELL_KEYS = {"method", "shots", "seed", "gamma", "datalist", "foundation_checkpoint", "ckpt_dir", "checkpoint",
              "output_dir", "bundle_root", "max_epochs", "iterations_per_epoch"}


class BenchmarkError(RuntimeError):
    """A run that cannot go on (settings that contradict the folder's, failed cells)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preset(name: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    key = name.replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


def _schedule(bundle: Path, configs: Sequence[str], overrides: Mapping[str, Any]) -> tuple[int, int]:
    """``(max_epochs, iterations_per_epoch)`` of the merged configs with the overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser.update(pairs=dict(overrides))
    return int(parser.get("max_epochs")), int(parser.get("iterations_per_epoch"))


def _ints(values: Any, name: str) -> list[int]:
    from dgst_monai.data.splits import parse_int_list

    return parse_int_list(values, name)


def _names(values: Any) -> list[str]:
    if values is None or values == "":
        return []
    if isinstance(values, str):
        return [v for v in values.replace(" ", "").split(",") if v]
    return [str(v) for v in values]


def _synthetic(
    cache: Path, target: str, synthetic: SyntheticDefault, bundle: Path, configs: Sequence[str],
    preset_overrides: Mapping[str, Any], foundation: str | None, executor: Any, progress: bool, threads: int | None,
    pretrain_epochs: int | None,
) -> tuple[str, str]:
    """The synthetic default's target datalist and foundation checkpoint, made (once) in ``cache``."""
    from dgst_monai.data.multisite import benchmark_datalist

    _say(f"synthetic default: {target} target in {cache}")
    datalist = benchmark_datalist(cache / target, target, n=synthetic.target_cases, **synthetic.knobs)
    if foundation is not None:
        return datalist, foundation
    source = benchmark_datalist(cache / "source", "source", n=synthetic.source_cases, **synthetic.knobs)
    overrides = {**preset_overrides, **synthetic.pretrain, "datalist": source}
    if pretrain_epochs is not None:
        overrides["max_epochs"] = int(pretrain_epochs)
    spec = {"bundle": str(bundle), "configs": ["train.json", *configs], "overrides": overrides}
    epochs, per_epoch = _schedule(bundle, spec["configs"], overrides)
    spec["iterations"] = epochs * per_epoch
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"foundation_{key}"
    model = folder / "model.pt"
    if (folder / "done.json").is_file() and read_json(folder / "pretrain.json", "pre-training") == spec:
        return datalist, str(model)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "pretrain.json", spec)
    _say(f"pre-training the foundation model on the source phantoms ({spec['iterations']} iterations) in {folder}")
    job = Job("pretrain", folder, spec["iterations"], threads)
    bars = Progress([job], enabled=progress)
    failures = executor.run([job], bars)
    bars.close()
    if failures:
        raise BenchmarkError(f"foundation pre-training failed: {failures[job.name]}")
    return datalist, str(model)


def _say(message: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _merge_names(old: Sequence[Any], new: Sequence[Any]) -> list[Any]:
    return list(old) + [v for v in new if v not in old]


def run_benchmark(
    out: str | os.PathLike[str],
    *,
    datalist: str | os.PathLike[str] | None = None,
    foundation: str | os.PathLike[str] | None = None,
    shots: Any = (5, 10, 20),
    seeds: Any = (0,),
    methods: Any = TABLE1_METHODS,
    ablation: Any = (),
    gamma: Any = (),
    preset: str = "cpu_small",
    max_epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    eval_at: Any = (),
    bundle_overrides: Mapping[str, Any] | None = None,
    target: str = "multisite",
    synthetic: str = "default",
    cache: str | os.PathLike[str] | None = None,
    pretrain_epochs: int | None = None,
    bundle: str | os.PathLike[str] = "ln_ct_dynunet",
    executor: str = "local",
    slurm: Mapping[str, Any] | None = None,
    keep_checkpoints: bool = False,
    threads: int | None = None,
    progress: bool = True,
    report: bool = True,
    command: str | None = None,
    reference: str = "full",
) -> Path:
    """Run every cell of the grid that has no result yet, then write the report.

    Args:
        out: the run folder.
        datalist: target datalist (MONAI format); default: the synthetic ``target``.
        foundation: foundation checkpoint (with its ``normalization.json`` beside it); default: pre-trained on
            the synthetic source set (cached).
        shots: shot levels, e.g. ``5,10,20``.
        seeds: seeds of the few-shot draw and of training.
        methods: Table 1 methods (``dgst_monai.METHODS`` names).
        ablation: Table 2 methods, run beside ``methods``.
        gamma: DGST gamma values of the sensitivity sweep (Fig. 3).
        preset: ``paper``, ``cpu_small`` or ``tiny`` (the network and, for cpu_small, its schedule).
        max_epochs: fine-tuning epochs (default: the bundle's finetune config).
        iterations_per_epoch: iterations per epoch (default: the preset's).
        eval_at: also score the checkpoints after these iteration counts (the budget sweep).
        bundle_overrides: further bundle overrides for every run of every cell (part of the protocol), e.g.
            ``{"precision": "bfloat16"}``; the keys the runner sets per cell are refused.
        target: synthetic target without ``datalist``: ``multisite`` or ``mediastinum`` (single scanner).
        synthetic: sizes of the synthetic default: ``default`` or ``tiny`` (tests).
        cache: folder of the synthetic data and foundation (default ``<out>/cache``).
        pretrain_epochs: epochs of the synthetic default's pre-training (default: the preset's schedule, e.g.
            cpu_small's 20 x 25 iterations); each schedule caches its own foundation.
        bundle: the bundle (a folder, or the name of a shipped bundle).
        executor: ``local``, ``slurm`` or ``submitit-local``.
        slurm: submitit parameters for ``slurm`` / ``submitit-local``.
        keep_checkpoints: keep each cell's checkpoints (``cells/<cell>/work/models``).
        threads: intra-op threads of each cell's process (default: torch's, the number of cores). Timings
            depend on it (and, in the last bits, results may too), so give every cell of a run the same.
        progress: show the progress bars.
        reference: the method the report compares every other with, pair by pair (default ``full``).
        report: write the report at the end.
        command: the command line that started the run, recorded in ``benchmark.json`` and the report.

    Returns:
        The path of ``report.md`` (or of ``benchmark.json`` without ``report``).

    Raises:
        BenchmarkError: the folder holds a run with other protocol settings, or cells failed (after the
            others ran and the report was written).
        ValueError: bad arguments.
    """
    from dgst_monai.data.datalists import load_split
    from dgst_monai.data.splits import make_splits
    from dgst_monai.resources import find_bundle

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle_path = find_bundle(str(bundle)).resolve()
    preset_configs, preset_overrides = _preset(preset)
    if synthetic not in SYNTHETIC:
        raise ValueError(f"unknown --synthetic {synthetic!r}; choose one of {', '.join(SYNTHETIC)}")
    if target not in ("multisite", "mediastinum"):
        raise ValueError(f"unknown --target {target!r}; choose multisite or mediastinum")
    shot_list, seed_list = _ints(shots, "--shots"), _ints(seeds, "--seeds")
    gamma_list, eval_list = _ints(gamma, "--gamma"), sorted(set(_ints(eval_at, "--eval_at")))
    cells = plan_grid(
        methods=_names(methods), shots=shot_list, seeds=seed_list, ablation=_names(ablation), gammas=gamma_list,
        default_gamma=int(read_json(bundle_path / "configs" / "finetune.json", "finetune config")["gamma"]),
    )
    reserved = sorted(set(dict(bundle_overrides or {})) & _CELL_KEYS)
    if reserved:
        raise ValueError(f"--overrides cannot set {reserved}: the runner sets them per cell")
    overrides = {**preset_overrides, **dict(bundle_overrides or {})}
    if max_epochs is not None:
        overrides["max_epochs"] = int(max_epochs)
    if iterations_per_epoch is not None:
        overrides["iterations_per_epoch"] = int(iterations_per_epoch)
    configs = ["train.json", *preset_configs]
    epochs, per_epoch = _schedule(bundle_path, [*configs, "finetune.json"], overrides)
    iterations = epochs * per_epoch
    late = [i for i in eval_list if not 1 <= i < iterations]
    if late:
        raise ValueError(f"--eval_at {late}: budget iterations must lie in 1..{iterations - 1} (the schedule has "
                         f"{epochs} x {per_epoch} = {iterations}; the final checkpoint is always scored)")
    local = make_executor(executor, out, slurm)

    if datalist is None:
        cache_dir = Path(cache) if cache is not None else out / "cache"
        datalist, foundation = _synthetic(
            cache_dir, target, SYNTHETIC[synthetic], bundle_path, preset_configs, preset_overrides,
            None if foundation is None else str(foundation), local, progress, threads, pretrain_epochs,
        )
        target_name = f"synthetic {target}"
    elif foundation is None:
        raise ValueError("--datalist needs --foundation (a model pre-trained on the source domain); without both "
                         "the synthetic default is used")
    else:
        target_name = str(datalist)
    foundation_path = Path(foundation).resolve()
    if not foundation_path.is_file():
        raise FileNotFoundError(f"foundation checkpoint {foundation_path} does not exist")

    splits = out / "splits.json"
    if not splits.is_file():
        _say(f"splitting {datalist} 8:2 (seed 0) into {splits}")
        make_splits(datalist, shots=shot_list, seeds=seed_list, output=splits)
    test_ids = sorted(c["case_id"] for c in load_split(splits, "test"))
    protocol = {
        "bundle": str(bundle_path),
        "configs": configs,
        "overrides": overrides,
        "datalist": str(splits.resolve()),
        "foundation": str(foundation_path),
        "foundation_sha256": _sha256(foundation_path),
        "iterations": iterations,
        "eval_at": eval_list,
        "save_cases": test_ids[:2],  # the qualitative figure's cases: the first two test ids, not hand-picked
    }
    grid = {
        "methods": _names(methods), "ablation": _names(ablation), "gammas": gamma_list, "shots": shot_list,
        "seeds": seed_list,
    }
    state_path = out / "benchmark.json"
    if state_path.is_file():
        previous = read_json(state_path, "benchmark state")
        differ = [k for k in _PROTOCOL_KEYS if previous["protocol"].get(k) != protocol[k]]
        if differ:
            raise BenchmarkError(
                f"{out} holds a benchmark with other settings ({', '.join(differ)}: "
                f"{[previous['protocol'].get(k) for k in differ]} there, {[protocol[k] for k in differ]} now); "
                "use another --output, or the same settings to resume it"
            )
        grid = {k: _merge_names(previous["grid"].get(k, []), v) for k, v in grid.items()}
    atomic_write_json(
        state_path,
        {
            "protocol": protocol, "grid": grid, "target": target_name, "preset": preset, "executor": executor,
            "threads": threads, "command": command,
            "schedule": {"max_epochs": epochs, "iterations_per_epoch": per_epoch},
        },
    )

    jobs = []
    for cell in cells:
        folder = out / "cells" / cell.id
        spec = {"cell": cell.as_dict(), "protocol": {**protocol, "keep_checkpoints": bool(keep_checkpoints)}}
        if is_finished(folder):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / CELL_FILE, spec)
        jobs.append(Job("cell", folder, 0 if cell.method == FOUNDATION else iterations, threads))
    _say(f"{len(cells) - len(jobs)} of {len(cells)} cells already finished; running {len(jobs)} with {local.name}")
    bars = Progress(jobs, enabled=progress)
    try:
        failures = local.run(jobs, bars)
    finally:
        bars.close()
    result = state_path
    if report:
        from dgst_monai.protocol.report import write_report

        result = write_report(out, reference=reference)
        _say(f"report: {result}")
    if failures:
        raise BenchmarkError(
            f"{len(failures)} cell(s) failed (the others are in the report; rerun to retry them):\n  "
            + "\n  ".join(f"{name}: {error}" for name, error in failures.items())
        )
    return result

