"""End-to-end demo on the embedded synthetic CT: pre-train, fine-tune (full vs DGST) from few shots, evaluate.

Every step is a run of the ``ln_ct_dynunet`` bundle through ``monai.bundle.run``, exactly what a user types
with ``python -m monai.bundle run``; the demo only chooses overrides and prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgst_monai.bundle.resources import bundle_dir
from dgst_monai.data.datalists import synthetic_datalist


class DemoSettingsError(ValueError):
    """Demo settings that do not fit each other (the message names both)."""


@dataclass(frozen=True)
class DemoSize:
    """Sizes of one demo run. ``default`` fits in 10 minutes on a 2-core CPU; ``tiny`` is the smoke test."""

    source_cases: int
    target_cases: int
    shots: int
    pretrain_epochs: int
    finetune_epochs: int
    iterations_per_epoch: int
    phantom_knobs: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)


#: The demo's phantoms carry more and larger nodes than the defaults, and its patches are centred on a node
#: half of the time (nnU-Net: a third), so that a few hundred CPU iterations learn something. The foundation
#: predicts no node at all until ~400-500 iterations (the benchmark's foundation: validation Dice 0 up to
#: iteration 375, 0.41 at 500), so the demo pre-trains for 600 (24 epochs; 14 left the nnU-Net-layout
#: foundation at Dice 0 on the target and on its own training cases).
_DEMO_TASK = {"node_short_axis_mm": (8.0, 20.0), "n_nodes": (8, 14)}
_DEMO_SAMPLING = {"crop_pos": 1, "crop_neg": 1}

#: ``dgst-monai demo --size``: ``tiny`` also runs the ``tiny`` network preset.
SIZES: dict[str, DemoSize] = {
    "default": DemoSize(
        source_cases=16,
        target_cases=12,
        shots=5,
        pretrain_epochs=24,
        finetune_epochs=4,
        iterations_per_epoch=25,
        phantom_knobs=_DEMO_TASK,
        overrides=_DEMO_SAMPLING,
    ),
    "tiny": DemoSize(
        source_cases=4,
        target_cases=4,
        shots=2,
        pretrain_epochs=1,
        finetune_epochs=1,
        iterations_per_epoch=3,
        phantom_knobs={**_DEMO_TASK, "fov_mm": (80.0, 80.0, 40.0), "n_nodes": (3, 5)},
        overrides={**_DEMO_SAMPLING, "preset": "tiny"},
    ),
}


def run_bundle(bundle: Path, configs: list[str], **overrides: Any) -> None:
    """``python -m monai.bundle run`` in-process: merge ``configs`` (in order) and apply ``overrides``."""
    from monai.bundle import run

    run(
        config_file=[str(bundle / "configs" / c) for c in configs],
        logging_file=str(bundle / "configs" / "logging.conf"),
        bundle_root=str(bundle),
        **overrides,
    )


def run_demo(
    output: str | Path | None = None,
    size: str = "default",
    shots: int | None = None,
    methods: tuple[str, ...] = ("full", "dgst"),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run the whole demo and return ``{row: summary}``; prints a DSC / NSD table and writes ``results.json``.

    Args:
        output: run folder (default ``runs/demo-<timestamp>``); everything is written under it.
        size: ``default`` or ``tiny`` (:data:`SIZES`).
        shots: annotated target-domain cases used for fine-tuning (default: the size's, 5 or 2).
        methods: fine-tuning methods to compare (names of ``dgst_monai.METHODS``).
        seed: seed of the few-shot draw and of training.
    """
    p, shots = _checked_settings(size, shots)
    run_dir = Path(output) if output else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    bundle = bundle_dir()
    started = time.time()

    def step(msg: str) -> None:
        print(f"[demo {time.time() - started:6.0f} s] {msg}", flush=True)

    step(f"writing everything under {run_dir.resolve()}")
    step(f"synthesising {p.source_cases} head-and-neck (source) and {p.target_cases} mediastinum (target) CTs")
    source, target = _datasets(run_dir / "data", p, seed)
    common = dict(p.overrides, seed=seed, iterations_per_epoch=p.iterations_per_epoch)
    configs = ["train.json", "cpu_small.json"]

    foundation = run_dir / "foundation"
    step(f"pre-training the foundation model on the source domain ({p.pretrain_epochs} epochs)")
    run_bundle(
        bundle,
        configs,
        datalist=source,
        ckpt_dir=str(foundation),
        max_epochs=p.pretrain_epochs,
        val_interval=p.pretrain_epochs,
        **common,
    )
    rows: dict[str, dict[str, Any]] = {}
    retained: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, ckpt_dir: Path) -> None:
        """Score a model on the held-out target cases and on the held-out source cases (what it retained)."""
        rows[name] = _evaluate(bundle, configs, target, ckpt_dir, common, ckpt_dir / "eval")
        retained[name] = _evaluate(bundle, configs, source, ckpt_dir, common, ckpt_dir / "eval_source")

    step("evaluating the foundation model on the held-out target and source cases (no adaptation)")
    evaluate("foundation (no fine-tuning)", foundation)
    for method in methods:
        tuned = run_dir / f"finetune_{method}"
        step(f"fine-tuning with {method} on {shots} target cases ({p.finetune_epochs} epochs)")
        run_bundle(
            bundle,
            [*configs, "finetune.json"],
            datalist=target,
            method=method,
            shots=shots,
            foundation_checkpoint=str(foundation / "model.pt"),
            ckpt_dir=str(tuned),
            max_epochs=p.finetune_epochs,
            **common,
        )
        step(f"evaluating {method} on the held-out target and source cases")
        evaluate(f"{method} ({shots}-shot)", tuned)
    results = {"target": rows, "source_retained": retained}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    step("done")
    print(format_table(rows, retained))
    return rows


def _checked_settings(size: str, shots: int | None) -> tuple[DemoSize, int]:
    """The size's settings and the shot count, refused with one line naming both where they do not fit."""
    if size not in SIZES:
        raise DemoSettingsError(f"unknown --size {size!r}; choose one of {', '.join(SIZES)}")
    p = SIZES[size]
    shots = p.shots if shots is None else shots
    available = p.target_cases - (max(1, round(0.2 * p.target_cases)) if p.target_cases >= 2 else 0)
    if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= available:
        raise DemoSettingsError(
            f"--shots {shots!r} does not fit --size {size}: it has {available} target training cases "
            f"(give --shots 1..{available}, or leave it out for {p.shots})"
        )
    return p, shots


def _datasets(folder: Path, p: DemoSize, seed: int) -> tuple[str, str]:
    """The source (head-and-neck) and target (mediastinum) phantom datalists of a demo run."""
    source = synthetic_datalist(folder / "hn", "hn", n=p.source_cases, seed=seed, **p.phantom_knobs)
    target = synthetic_datalist(folder / "mediastinum", "mediastinum", n=p.target_cases, seed=seed + 1,
                                **p.phantom_knobs)
    return source, target


def _evaluate(
    bundle: Path, configs: list[str], datalist: str, ckpt_dir: Path, common: dict[str, Any], output_dir: Path
) -> dict:
    run_bundle(bundle, [*configs, "evaluate.json"], datalist=datalist, ckpt_dir=str(ckpt_dir),
               output_dir=str(output_dir), **common)
    return json.loads((output_dir / "summary.json").read_text(encoding="utf-8"))


def format_table(rows: dict[str, dict[str, Any]], retained: dict[str, dict[str, Any]] | None = None) -> str:
    """A text table per model: target DSC and NSD@1mm (mean +- std, in %) and, beside them, the DSC it retains on
    the held-out source (head-and-neck) cases: adaptation against forgetting."""
    def cell(summary: dict[str, Any], key: str) -> str:
        return f"{100 * summary[key]['mean']:6.2f} +- {100 * summary[key]['std']:5.2f}"

    header = f"{'model':32s} {'target DSC %':>16s} {'target NSD@1mm %':>17s} {'cases':>6s}"
    lines = [header + (f" {'source DSC % (retained)':>24s} {'cases':>6s}" if retained else "")]
    for name, summary in rows.items():
        line = f"{name:32s} {cell(summary, 'dice'):>16s} {cell(summary, 'nsd_1mm'):>17s} {summary['n_cases']:>6d}"
        if retained and name in retained:
            line += f" {cell(retained[name], 'dice'):>24s} {retained[name]['n_cases']:>6d}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_demo()
