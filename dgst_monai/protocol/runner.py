"""``dgst-monai benchmark``: the paper's protocol over a grid of methods x shots x seeds, resumable, local or Slurm.

The protocol, exactly as the paper's: one seeded 8:2 split of the target data (a datalist's own ``test`` list
is kept), nested k-shot subsets of its training part (:func:`dgst_monai.data.datalists.few_shot`), every
method fine-tuned from the same foundation checkpoint with the same schedule through the bundle's
``finetune.json``, the final checkpoint scored on the whole test split by its ``evaluate.json`` (DSC, NSD@1mm,
lymph-node detection per case). The budget sweep (``eval_at``) also scores the checkpoints of chosen
iteration counts of the same runs.

Without a datalist and a foundation checkpoint the synthetic default is used (:mod:`dgst_monai.data.phantoms.benchmark_sets`):
source and target phantoms and a foundation model pre-trained once on the source with the bundle's train
config, all cached in ``cache`` (default ``<out>/cache``), so several runs can share them. Every cell's final
checkpoint is also scored on a held-out source-domain test set (``source_test``; the synthetic default makes
one): what fine-tuning keeps of the foundation's knowledge, reported beside the target as "retained".

Layout of ``out``::

    benchmark.json          the protocol (checked on every rerun) and the grid
    splits.json             the split and few-shot subsets: the datalist of every cell
    cells/<cell>/           cell.json, result.json, per_case.csv, log.txt, qualitative/ (see protocol.cell)
    per_case.csv, summary.csv, report.md, *.png   (protocol.report)

A rerun skips the cells that have a ``result.json``; a killed run loses only the cells in progress.

Example::

    from dgst_monai.protocol import run_benchmark
    run_benchmark("runs/bench", shots=[5, 10, 20], seeds=[0], methods=["full", "dgst"], preset="cpu-small")
"""

from __future__ import annotations

import dataclasses
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
from dgst_monai.protocol.grid import FOUNDATION, TABLE1_METHODS, Cell, plan_grid

__all__ = ["SCHEDULE_OVERLAYS", "SYNTHETIC", "BenchmarkError", "BenchmarkSpec", "SyntheticDefault", "run_benchmark"]

#: The schedule overlay (bundle configs added after ``train.json``) each network preset runs with; the paper's
#: presets run the bundle's own schedule.
SCHEDULE_OVERLAYS: dict[str, tuple[str, ...]] = {"cpu-small": ("cpu_small.json",), "tiny": ("cpu_small.json",)}


@dataclass(frozen=True)
class SyntheticDefault:
    """Sizes of the synthetic default (None: the data manifest's / the bundle's).

    Attributes:
        source_cases: source (pre-training) cases.
        target_cases: target cases before the 8:2 split.
        source_test_cases: held-out source cases the cells are also scored on.
        knobs: phantom knobs over the manifest's, for every set (e.g. a small field of view).
        pretrain: overrides of the pre-training run (schedule); empty: the preset's own schedule.
    """

    source_cases: int | None = None
    target_cases: int | None = None
    source_test_cases: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] = field(default_factory=dict)


#: ``--synthetic``: ``default`` is the manifest's (100 target cases: 20 test cases) with the preset's
#: pre-training schedule; ``tiny`` is the tests' (a few small phantoms, two pre-training iterations).
SYNTHETIC: dict[str, SyntheticDefault] = {
    "default": SyntheticDefault(),
    "tiny": SyntheticDefault(
        source_cases=3,
        target_cases=10,
        source_test_cases=2,
        knobs={"fov_mm": (64.0, 64.0, 32.0)},
        pretrain={"max_epochs": 1, "iterations_per_epoch": 2, "val_interval": 0, "num_validation": 0},
    ),
}

#: ``--source_test`` value that scores no source test set.
NO_SOURCE_TEST = "none"


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything a benchmark run is asked for (``dgst-monai benchmark``'s options).

    Attributes:
        datalist: target datalist (MONAI format); default: the synthetic ``target``.
        foundation: foundation checkpoint (with its ``normalization.json`` beside it); default: pre-trained on
            the synthetic source set (cached).
        source_test: datalist whose ``test`` cases are the held-out source-domain set every cell's final
            checkpoint is also scored on (the report's "retained" columns); the synthetic default makes one;
            ``none`` scores none.
        shots: shot levels, e.g. ``5,10,20``.
        seeds: seeds of the few-shot draw and of training.
        methods: Table 1 methods (``dgst_monai.METHODS`` names).
        ablation: Table 2 methods, run beside ``methods``.
        gamma: DGST gamma values of the sensitivity sweep (Fig. 3).
        update: update modes every sparse method also runs with (``strict``, ``gradient``).
        lr: learning rates every method also runs with (besides the bundle's).
        preset: the network preset (``dgst_monai.networks.PRESETS``: ``paper``, ``cpu-small``, ``tiny``, ...);
            the CPU presets run the ``cpu_small.json`` schedule (:data:`SCHEDULE_OVERLAYS`).
        max_epochs: fine-tuning epochs (default: the bundle's finetune config).
        iterations_per_epoch: iterations per epoch (default: the schedule's).
        eval_at: also score the checkpoints after these iteration counts (the budget sweep).
        bundle_overrides: further bundle overrides for every run of every cell (part of the protocol), e.g.
            ``{"precision": "bfloat16"}``; the keys the runner sets per cell are refused.
        target: synthetic target without ``datalist``: one of ``dgst_monai.data.phantoms.benchmark_sets.BENCHMARK_TARGETS``.
        synthetic: sizes of the synthetic default: ``default`` or ``tiny`` (tests).
        cache: folder of the synthetic data and foundation (default ``<out>/cache``).
        pretrain_epochs: epochs of the synthetic default's pre-training (default: the schedule's, e.g.
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
    """

    datalist: str | os.PathLike[str] | None = None
    foundation: str | os.PathLike[str] | None = None
    source_test: str | os.PathLike[str] | None = None
    shots: Any = (5, 10, 20)
    seeds: Any = (0,)
    methods: Any = TABLE1_METHODS
    ablation: Any = ()
    gamma: Any = ()
    update: Any = ()
    lr: Any = ()
    preset: str = "cpu-small"
    max_epochs: int | None = None
    iterations_per_epoch: int | None = None
    eval_at: Any = ()
    bundle_overrides: Mapping[str, Any] | None = None
    target: str = "multisite"
    synthetic: str = "default"
    cache: str | os.PathLike[str] | None = None
    pretrain_epochs: int | None = None
    bundle: str | os.PathLike[str] = "ln_ct_dynunet"
    executor: str = "local"
    slurm: Mapping[str, Any] | None = None
    keep_checkpoints: bool = False
    threads: int | None = None
    progress: bool = True
    report: bool = True
    command: str | None = None
    reference: str = "full"

#: The keys of ``benchmark.json``'s protocol: a rerun into the same folder must agree on all of them.
_PROTOCOL_KEYS = ("bundle", "configs", "overrides", "datalist", "foundation", "foundation_sha256", "iterations",
                  "eval_at", "save_cases", "source_test")


#: Overrides the runner sets itself for each cell.
_CELL_KEYS = {"method", "shots", "seed", "gamma", "update", "learning_rate", "datalist", "foundation_checkpoint",
              "ckpt_dir", "checkpoint", "output_dir", "bundle_root", "max_epochs", "iterations_per_epoch"}


class BenchmarkError(RuntimeError):
    """A run that cannot go on (settings that contradict the folder's, failed cells)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preset(name: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The schedule overlays and the override that select the network preset ``name``."""
    from dgst_monai.networks.planner import PRESETS

    key = name.replace("_", "-")
    if key not in PRESETS:
        raise ValueError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return SCHEDULE_OVERLAYS.get(key, ()), {"preset": key}


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
    if isinstance(values, (int, float)):
        return [str(values)]
    return [str(v) for v in values]


def _floats(values: Any, name: str) -> list[float]:
    try:
        return [float(v) for v in _names(values)]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {values!r}") from None


def _say(message: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _merge_names(old: Sequence[Any], new: Sequence[Any]) -> list[Any]:
    return list(old) + [v for v in new if v not in old]


@dataclass(frozen=True)
class _Data:
    """The target datalist, the foundation checkpoint and the source test set of a run."""

    target_name: str
    datalist: str
    foundation: Path
    source_test: str | None


def _synthetic(spec: BenchmarkSpec, out: Path, bundle: Path, executor: Any) -> _Data:
    """The synthetic default's target datalist, source test set and foundation checkpoint, made (once) in the cache."""
    from dgst_monai.data.phantoms.benchmark_sets import benchmark_datalist

    cache = Path(spec.cache) if spec.cache is not None else out / "cache"
    sizes = SYNTHETIC[spec.synthetic]
    _say(f"synthetic default: {spec.target} target in {cache}")
    datalist = benchmark_datalist(cache / spec.target, spec.target, n=sizes.target_cases, **sizes.knobs)
    source_test = spec.source_test
    if source_test is None:
        source_test = benchmark_datalist(cache / "source_test", "source_test", n=sizes.source_test_cases, **sizes.knobs)
    name = f"synthetic {spec.target}"
    if spec.foundation is not None:
        return _Data(name, datalist, Path(spec.foundation), _source_test(source_test))
    return _Data(name, datalist, _pretrain(spec, cache, bundle, executor), _source_test(source_test))


def _source_test(value: str | os.PathLike[str] | None) -> str | None:
    if value is None or str(value) == NO_SOURCE_TEST:
        return None
    path = Path(value).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--source_test {value}: no such datalist")
    from dgst_monai.data.datalists import load_split

    if not load_split(path, "test"):
        raise ValueError(f"--source_test {value}: the datalist has no `test` cases to score")
    return str(path)


def _pretrain(spec: BenchmarkSpec, cache: Path, bundle: Path, executor: Any) -> Path:
    """The synthetic source set's foundation model, pre-trained once per schedule with the bundle's train config."""
    from dgst_monai.data.phantoms.benchmark_sets import benchmark_datalist

    sizes = SYNTHETIC[spec.synthetic]
    configs, preset_overrides = _preset(spec.preset)
    source = benchmark_datalist(cache / "source", "source", n=sizes.source_cases, **sizes.knobs)
    overrides = {**preset_overrides, **sizes.pretrain, "datalist": source}
    if spec.pretrain_epochs is not None:
        overrides["max_epochs"] = int(spec.pretrain_epochs)
    job_spec = {"bundle": str(bundle), "configs": ["train.json", *configs], "overrides": overrides}
    epochs, per_epoch = _schedule(bundle, job_spec["configs"], overrides)
    job_spec["iterations"] = epochs * per_epoch
    key = hashlib.sha256(json.dumps(job_spec, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"foundation_{key}"
    model = folder / "model.pt"
    if (folder / "done.json").is_file() and read_json(folder / "pretrain.json", "pre-training") == job_spec:
        return model
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "pretrain.json", job_spec)
    _say(f"pre-training the foundation model on the source phantoms ({job_spec['iterations']} iterations) in {folder}")
    job = Job("pretrain", folder, job_spec["iterations"], spec.threads)
    bars = Progress([job], enabled=spec.progress)
    failures = executor.run([job], bars)
    bars.close()
    if failures:
        raise BenchmarkError(f"foundation pre-training failed: {failures[job.name]}")
    return model


def _data(spec: BenchmarkSpec, out: Path, bundle: Path, executor: Any) -> _Data:
    if spec.datalist is None:
        if spec.synthetic not in SYNTHETIC:
            raise ValueError(f"unknown --synthetic {spec.synthetic!r}; choose one of {', '.join(SYNTHETIC)}")
        data = _synthetic(spec, out, bundle, executor)
    elif spec.foundation is None:
        raise ValueError("--datalist needs --foundation (a model pre-trained on the source domain); without both "
                         "the synthetic default is used")
    else:
        data = _Data(str(spec.datalist), str(spec.datalist), Path(spec.foundation), _source_test(spec.source_test))
    foundation = data.foundation.resolve()
    if not foundation.is_file():
        raise FileNotFoundError(f"foundation checkpoint {foundation} does not exist")
    return dataclasses.replace(data, foundation=foundation)


def _plan(spec: BenchmarkSpec, bundle: Path) -> tuple[list[Cell], dict[str, Any]]:
    """The grid's cells (:func:`~dgst_monai.protocol.grid.plan_grid`) and its record for ``benchmark.json``."""
    defaults = read_json(bundle / "configs" / "finetune.json", "finetune config")
    grid = {
        "methods": _names(spec.methods), "ablation": _names(spec.ablation), "gammas": _ints(spec.gamma, "--gamma"),
        "updates": _names(spec.update), "learning_rates": _floats(spec.lr, "--lr"),
        "shots": _ints(spec.shots, "--shots"), "seeds": _ints(spec.seeds, "--seeds"),
    }
    cells = plan_grid(
        methods=grid["methods"], shots=grid["shots"], seeds=grid["seeds"], ablation=grid["ablation"],
        gammas=grid["gammas"], default_gamma=int(defaults["gamma"]), updates=grid["updates"],
        default_update=str(defaults["update"]), learning_rates=grid["learning_rates"],
        default_lr=float(defaults["learning_rate"]),
    )
    return cells, grid


def _overrides(spec: BenchmarkSpec) -> dict[str, Any]:
    reserved = sorted(set(dict(spec.bundle_overrides or {})) & _CELL_KEYS)
    if reserved:
        raise ValueError(f"--overrides cannot set {reserved}: the runner sets them per cell")
    overrides = {**_preset(spec.preset)[1], **dict(spec.bundle_overrides or {})}
    if spec.max_epochs is not None:
        overrides["max_epochs"] = int(spec.max_epochs)
    if spec.iterations_per_epoch is not None:
        overrides["iterations_per_epoch"] = int(spec.iterations_per_epoch)
    return overrides


def _check(spec: BenchmarkSpec) -> None:
    """Refuse bad arguments before any work."""
    from dgst_monai.data.phantoms.benchmark_sets import BENCHMARK_TARGETS
    from dgst_monai.methods import get_method

    if spec.target not in BENCHMARK_TARGETS:
        raise ValueError(f"unknown --target {spec.target!r}; choose one of {', '.join(BENCHMARK_TARGETS)}")
    get_method(spec.reference)


def _save_state(out: Path, spec: BenchmarkSpec, protocol: dict[str, Any], grid: dict[str, Any], data: _Data,
                schedule: tuple[int, int]) -> None:
    """Write ``benchmark.json``; a folder with another protocol is refused, a larger grid is merged."""
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
            "protocol": protocol, "grid": grid, "target": data.target_name, "preset": spec.preset,
            "executor": spec.executor, "threads": spec.threads, "command": spec.command,
            "schedule": {"max_epochs": schedule[0], "iterations_per_epoch": schedule[1]},
        },
    )


def _split(out: Path, data: _Data, grid: Mapping[str, Any]) -> dict[str, Any]:
    """``splits.json`` (made once: the seeded 8:2 split unless the datalist has a test list, and the few-shot
    subsets, extended when the grid gains seeds or shot levels) as the protocol's ``datalist``, and the
    qualitative figure's cases."""
    from dgst_monai.data.datalists import load_split
    from dgst_monai.data.splits import extend_splits, make_splits

    splits = out / "splits.json"
    if not splits.is_file():
        _say(f"the split and few-shot subsets of {data.datalist}: {splits}")
        make_splits(data.datalist, shots=grid["shots"], seeds=grid["seeds"], output=splits)
    else:
        added = extend_splits(splits, shots=grid["shots"], seeds=grid["seeds"])
        if added:
            _say(f"{splits}: added the few-shot subsets (seed, shots) {added}")
    test_ids = sorted(c["case_id"] for c in load_split(splits, "test"))
    # the qualitative figure's cases: the first two test ids, not hand-picked
    return {"datalist": str(splits.resolve()), "save_cases": test_ids[:2]}


def _jobs(out: Path, cells: Sequence[Cell], protocol: Mapping[str, Any], spec: BenchmarkSpec) -> list[Job]:
    """A job per cell without a result; each cell folder gets its ``cell.json``."""
    jobs = []
    for cell in cells:
        folder = out / "cells" / cell.id
        if is_finished(folder):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        job_spec = {"cell": cell.as_dict(), "protocol": {**protocol, "keep_checkpoints": bool(spec.keep_checkpoints)}}
        atomic_write_json(folder / CELL_FILE, job_spec)
        jobs.append(Job("cell", folder, 0 if cell.method == FOUNDATION else int(protocol["iterations"]), spec.threads))
    return jobs


def run_benchmark(out: str | os.PathLike[str], spec: BenchmarkSpec | None = None, **options: Any) -> Path:
    """Run every cell of the grid that has no result yet, then write the report.

    Args:
        out: the run folder.
        spec: what to run; or its fields as keyword ``options`` (see :class:`BenchmarkSpec`).

    Returns:
        The path of ``report.md`` (or of ``benchmark.json`` without ``report``).

    Raises:
        BenchmarkError: the folder holds a run with other protocol settings, or cells failed (after the
            others ran and the report was written).
        ValueError: bad arguments.
    """
    from dgst_monai.bundle.resources import find_bundle

    spec = dataclasses.replace(spec or BenchmarkSpec(), **options)
    out = Path(out).resolve()  # cells run bundle configs by path, from any working directory
    out.mkdir(parents=True, exist_ok=True)
    bundle_path = find_bundle(str(spec.bundle)).resolve()
    _check(spec)
    cells, grid = _plan(spec, bundle_path)
    overrides = _overrides(spec)
    configs = ["train.json", *_preset(spec.preset)[0]]
    epochs, per_epoch = _schedule(bundle_path, [*configs, "finetune.json"], overrides)
    eval_list = sorted(set(_ints(spec.eval_at, "--eval_at")))
    late = [i for i in eval_list if not 1 <= i < epochs * per_epoch]
    if late:
        raise ValueError(f"--eval_at {late}: budget iterations must lie in 1..{epochs * per_epoch - 1} (the schedule "
                         f"has {epochs} x {per_epoch} = {epochs * per_epoch}; the final checkpoint is always scored)")
    executor = make_executor(spec.executor, out, spec.slurm)
    data = _data(spec, out, bundle_path, executor)
    protocol = {
        "bundle": str(bundle_path),
        "configs": configs,
        "overrides": overrides,
        **_split(out, data, grid),
        "foundation": str(data.foundation),
        "foundation_sha256": _sha256(data.foundation),
        "iterations": epochs * per_epoch,
        "eval_at": eval_list,
        "source_test": data.source_test,
    }
    _save_state(out, spec, protocol, grid, data, (epochs, per_epoch))
    jobs = _jobs(out, cells, protocol, spec)
    _say(f"{len(cells) - len(jobs)} of {len(cells)} cells already finished; running {len(jobs)} with {executor.name}")
    bars = Progress(jobs, enabled=spec.progress)
    try:
        failures = executor.run(jobs, bars)
    finally:
        bars.close()
    result = out / "benchmark.json"
    if spec.report:
        from dgst_monai.protocol.report import write_report

        result = write_report(out, reference=spec.reference)
        _say(f"report: {result}")
    if failures:
        raise BenchmarkError(
            f"{len(failures)} cell(s) failed (the others are in the report; rerun to retry them):\n  "
            + "\n  ".join(f"{name}: {error}" for name, error in failures.items())
        )
    return result
