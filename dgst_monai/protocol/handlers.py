"""Ignite handlers a benchmark cell adds to the bundle's trainer and evaluator through its config overlay.

* :class:`IterationClock` (trainer): wall and CPU seconds of every iteration, and a progress file the runner
  polls for its iteration bar;
* :class:`CheckpointsAt` (trainer): the fine-tuned model at given iteration counts (the budget sweep);
* :class:`NodeMetricsWriter` (evaluator): lymph-node-level metrics per case, and the predicted masks of the
  cases the qualitative figure shows.

They write their files atomically (:mod:`dgst_monai.files`), so a killed cell leaves no half-written file.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from dgst_monai.data.cases import batch_case_ids
from dgst_monai.files import atomic_open, atomic_torch_save, atomic_write_json
from dgst_monai.metrics import node_metrics

__all__ = ["CheckpointsAt", "IterationClock", "NodeMetricsWriter", "axial_axis_of", "spacing_of", "write_progress"]


def write_progress(path: str | os.PathLike[str], **fields: Any) -> None:
    """Replace the progress file ``path`` by ``fields`` (JSON; atomic, so a poller never reads half of it)."""
    atomic_write_json(path, fields, indent=None)


class IterationClock:
    """Time every training iteration and report progress.

    An iteration's duration runs from the end of the previous one (or the start of its epoch) to its own end, so
    it includes loading the batch and every per-iteration handler (DGST's selection and restore): what a user
    waits for, the paper's Table 2 column. Epoch-end work (checkpointing, learning-rate step) is not counted.

    Args:
        timing_path: JSON written when the run completes: ``{"seconds": [...], "cpu_seconds": [...]}``, one
            entry per iteration (wall clock and this process's CPU time).
        progress_path: JSON rewritten at most every ``interval`` seconds and at the end:
            ``{"phase": "train", "iteration": i, "total": n}``.
        interval: seconds between progress writes.

    Example::

        IterationClock("timing.json", "progress.json").attach(trainer)
    """

    def __init__(
        self, timing_path: str | os.PathLike[str], progress_path: str | os.PathLike[str], interval: float = 1.0
    ) -> None:
        self.timing_path = Path(timing_path)
        self.progress_path = Path(progress_path)
        self.interval = float(interval)
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._last = (0.0, 0.0)
        self._written = 0.0

    def attach(self, engine: Engine) -> None:
        """Register the clock on ``engine``'s epoch start, iteration end and completion."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._restart)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _restart(self, engine: Engine) -> None:
        self._last = (time.perf_counter(), time.process_time())

    def __call__(self, engine: Engine) -> None:
        """Record the iteration that just ended; rewrite the progress file if ``interval`` has passed."""
        now = (time.perf_counter(), time.process_time())
        self.seconds.append(now[0] - self._last[0])
        self.cpu_seconds.append(now[1] - self._last[1])
        self._last = now
        if now[0] - self._written >= self.interval:
            self._progress(engine)

    def _progress(self, engine: Engine) -> None:
        total = engine.state.max_epochs * (engine.state.epoch_length or 0)
        write_progress(self.progress_path, phase="train", iteration=engine.state.iteration, total=total)
        self._written = time.perf_counter()

    def _finish(self, engine: Engine) -> None:
        self._progress(engine)
        atomic_write_json(self.timing_path, {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds})


class CheckpointsAt:
    """Save the model's state dict after given iteration counts: ``<save_dir>/model_it<N>.pt``.

    The file holds what the bundle's ``FinalModelSaver`` holds (pass the same object, the bundle's
    ``@final_model``), so the evaluate config scores it exactly as it scores ``model.pt``. Saved at
    ``ITERATION_COMPLETED``, after the DGST handler restored the unselected entries (``MODEL_COMPLETED``).

    Args:
        save_dir: folder of the checkpoints (the run's ``ckpt_dir``, where its ``normalization.json`` lies).
        model: anything with ``state_dict()``.
        iterations: the iteration counts (1-based, as ``engine.state.iteration``).

    Example::

        CheckpointsAt("models", MergedView(network), [100, 300, 1000]).attach(trainer)
    """

    def __init__(self, save_dir: str | os.PathLike[str], model: Any, iterations: Sequence[int]) -> None:
        self.save_dir = Path(save_dir)
        self.model = model
        self.iterations = sorted({int(i) for i in iterations})
        if any(i < 1 for i in self.iterations):
            raise ValueError(f"iteration counts must be >= 1, got {list(iterations)}")

    @staticmethod
    def path(save_dir: str | os.PathLike[str], iteration: int) -> Path:
        """Where the checkpoint of ``iteration`` goes."""
        return Path(save_dir) / f"model_it{int(iteration)}.pt"

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s iteration end."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Save if the iteration just completed is one of ``iterations``."""
        if engine.state.iteration in self.iterations:
            atomic_torch_save(self.model.state_dict(), self.path(self.save_dir, engine.state.iteration))


def spacing_of(affine: Any) -> tuple[float, float, float]:
    """Voxel size per array axis (mm): the column norms of the affine's 3x3 part."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(a, axis=0))  # type: ignore[return-value]


def axial_axis_of(affine: Any) -> int:
    """The array axis across axial slices: the one whose direction is closest to the world's head-foot axis."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(a[2]) / np.linalg.norm(a, axis=0)))


class NodeMetricsWriter:
    """Lymph-node-level metrics of every evaluated case (:func:`dgst_monai.metrics.node_metrics`), as a CSV.

    Reads each case's ``pred`` and ``label`` from the evaluator's output (one-hot MetaTensors after the
    bundle's postprocessing, in the image's original space) and its spacing and axial axis from the label's
    affine. Writes ``csv_path`` (``case_id`` and one column per metric; empty where a ratio is undefined)
    when the evaluation completes; also saves the predicted mask of each case in ``save_cases`` as
    ``<save_dir>/<case_id>.npz`` (key ``pred``, uint8, array order of the image file) for the qualitative figure.

    Args:
        csv_path: the per-case table.
        save_dir: folder of the saved predictions (needed if ``save_cases`` is not empty).
        save_cases: case ids whose prediction to save.
        case_key: key of the case id in each output item.

    Example::

        NodeMetricsWriter("eval/node_metrics.csv", save_dir="qualitative", save_cases=["multisite_0007"]).attach(
            evaluator
        )
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        save_dir: str | os.PathLike[str] | None = None,
        save_cases: Sequence[str] = (),
        case_key: str = "case_id",
    ) -> None:
        self.csv_path = Path(csv_path)
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.save_cases = {str(c) for c in save_cases}
        if self.save_cases and self.save_dir is None:
            raise ValueError("NodeMetricsWriter: `save_cases` needs a `save_dir`")
        self.case_key = case_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``'s epoch start (reset), iteration end and completion."""
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def __call__(self, engine: Engine) -> None:
        """Score the cases of the batch just evaluated."""
        output = engine.state.output
        items = output if isinstance(output, (list, tuple)) else [output]
        case_ids = self._case_ids(engine.state.batch)
        if len(case_ids) != len(items):
            raise ValueError(f"NodeMetricsWriter: {len(items)} evaluated cases, {len(case_ids)} case ids in the batch")
        for item, case_id in zip(items, case_ids):
            if not isinstance(item, Mapping) or "pred" not in item or "label" not in item:
                raise ValueError(
                    "NodeMetricsWriter needs the evaluator's decollated output (dicts with 'pred' and 'label'); "
                    f"got {type(item).__name__}"
                )
            pred, label = self._foreground(item["pred"], "pred"), self._foreground(item["label"], "label")
            if not isinstance(item["label"], MetaTensor):
                raise ValueError(f"case {case_id}: the label carries no affine (not a MetaTensor)")
            affine = item["label"].affine
            metrics = node_metrics(pred, label, spacing_of(affine), axial_axis=axial_axis_of(affine))
            self.rows.append({"case_id": str(case_id), **metrics})
            if str(case_id) in self.save_cases:
                assert self.save_dir is not None
                with atomic_open(self.save_dir / f"{case_id}.npz", "wb") as f:
                    np.savez_compressed(f, pred=pred.astype(np.uint8))

    def _case_ids(self, batch: Any) -> list[str]:
        """The case ids of the batch the loader gave (collated: a dict of lists; or a list of dicts)."""
        ids = batch_case_ids(batch, self.case_key)
        if ids is not None:
            return ids
        raise ValueError(
            f"NodeMetricsWriter: the evaluated batch has no {self.case_key!r}; give the datalist entries a case id "
            "(dgst_monai.data.datalists.load_split does)"
        )

    @staticmethod
    def _foreground(data: Any, name: str) -> np.ndarray:
        """Channel 1 of a one-hot ``[C, X, Y, Z]`` tensor as a boolean array."""
        t = data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
        if t.ndim != 4 or t.shape[0] < 2:
            raise ValueError(f"{name} must be one-hot [C, X, Y, Z] with C >= 2, got shape {tuple(t.shape)}")
        return t[1].detach().cpu().numpy() > 0.5

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            raise ValueError("NodeMetricsWriter: no case was evaluated")
        columns = list(self.rows[0])
        with atomic_open(self.csv_path, newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(columns)
            for row in self.rows:
                writer.writerow([_cell(row[c]) for c in columns])


def _cell(value: Any) -> str:
    """A CSV field: exact floats, empty for NaN (an undefined ratio)."""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)
