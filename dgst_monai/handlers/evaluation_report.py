"""Ignite handler writing an evaluator's per-case metrics (CSV) and their summary (JSON)."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.utils import string_list_all_gather

from dgst_monai.metrics import summarize

__all__ = ["EvaluationReport", "case_id_from_path"]

#: Image file extensions stripped from file names to form case ids (longest first, matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".npz", ".npy", ".png", ".tiff", ".tif",
)  # fmt: skip

#: File stems that name a role, not a case (``segrap_0001/image.nii.gz``): the parent folder is the case id.
GENERIC_STEMS: frozenset[str] = frozenset(
    {"image", "img", "ct", "image_contrast", "label", "labels", "seg", "segmentation", "mask", "data", "volume"}
)


def case_id_from_path(path: str | os.PathLike[str], generic_stems: Collection[str] = GENERIC_STEMS) -> str:
    """Case id of an image path: the file name without its image extension, or the parent folder's name
    if that stem is generic.

    Args:
        path: the image's ``filename_or_obj`` (a file, or a folder such as a DICOM series).
        generic_stems: lower-case stems meaning "the image of this folder's case".

    Returns:
        e.g. ``case_001`` for ``/data/case_001.nii.gz``, ``segrap_0001`` for ``/data/segrap_0001/image.nii.gz``.

    Raises:
        ValueError: if ``path`` is empty.

    Example::

        case_id_from_path("/data/segrap_0001/image.nii.gz")  # "segrap_0001"
    """
    p = PurePath(os.fspath(path))
    name = p.name
    if not name:
        raise ValueError(f"cannot derive a case id from the empty path {path!r}.")
    stem = name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            stem = name[: -len(ext)]
            break
    if stem.lower() in generic_stems and p.parent.name:
        return p.parent.name
    return stem


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # same folder, so same file system: the rename is atomic
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class EvaluationReport:
    """Ignite handler that writes ``per_case_metrics.csv`` and ``summary.json`` when an evaluator completes.

    Per-case values come from ``engine.state.metric_details`` (filled by MONAI metric handlers with
    ``save_details=True``, e.g. ``MeanDice`` or
    :class:`dgst_monai.handlers.surface_dice.SurfaceDiceHandler`), shape ``(n_cases, n_classes)``. Case ids
    come from each batch's image meta ``filename_or_obj``, collected at every ``ITERATION_COMPLETED`` (as
    MONAI's ``MetricsSaver`` does) and turned into ids by :func:`case_id_from_path`.

    ``per_case_metrics.csv`` has columns ``case_id`` and one per metric (``<metric>_<i>`` per class index
    ``i`` of the details if a metric has several classes). ``summary.json`` is
    ``{<column>: {"mean", "std", "n"}, "n_cases": n}``, the std being the population one (``ddof=0``). Both
    files are written atomically. Non-finite per-case values raise instead of being skipped: with MONAI's
    ``DiceMetric``, use ``ignore_empty=False`` to score empty labels (1.0 / 0.0) rather than NaN.

    Under torch.distributed, case ids are gathered from every rank (metric details are already gathered by
    the metric handlers) and only rank 0 writes. Partition the data without padding (MONAI's
    ``partition_dataset(..., even_divisible=False)``) or padded duplicates will be reported.

    Args:
        output_dir: folder for the two files (created if missing).
        metric_names: names of the engine's metrics to report, e.g. ``["dice", "nsd_1mm"]``.
        image_key: key of the image in the batch, whose meta holds ``filename_or_obj``.
        batch_transform: optional callable returning the meta data (dict of lists, or list of dicts) of
            ``engine.state.batch``, as in ``MetricsSaver``; by default it is read from ``image_key``.
        csv_name: file name of the per-case table.
        summary_name: file name of the summary.

    Example::

        evaluator = SupervisedEvaluator(..., key_val_metric={"dice": MeanDice(...)},
                                        additional_metrics={"nsd_1mm": SurfaceDiceHandler(tolerance_mm=1.0, ...)})
        EvaluationReport(output_dir="eval", metric_names=["dice", "nsd_1mm"]).attach(evaluator)
        evaluator.run()  # writes eval/per_case_metrics.csv and eval/summary.json
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        metric_names: Sequence[str],
        image_key: str = "image",
        batch_transform: Callable[[Any], Any] | None = None,
        csv_name: str = "per_case_metrics.csv",
        summary_name: str = "summary.json",
    ) -> None:
        if isinstance(metric_names, str) or not metric_names:
            raise ValueError(f"`metric_names` must be a non-empty list of metric names, got {metric_names!r}.")
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.image_key = image_key
        self.batch_transform = batch_transform
        self.csv_name = csv_name
        self.summary_name = summary_name
        self._filenames: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``: reset at each epoch start, collect ids per iteration, write at completion.

        Args:
            engine: the evaluator.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_filenames)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, _engine: Engine) -> None:
        self._filenames = []

    def _collect_filenames(self, engine: Engine) -> None:
        self._filenames.extend(str(f) for f in self._batch_filenames(engine.state.batch))

    def _batch_filenames(self, batch: Any) -> list[Any]:
        """``filename_or_obj`` of every case of a batch, collated (dict) or decollated (list of dicts)."""
        if self.batch_transform is not None:
            meta = self.batch_transform(batch)
            metas = decollate_batch(meta) if isinstance(meta, Mapping) else list(meta)
        elif isinstance(batch, Mapping):
            metas = [self._meta(batch)]
        elif isinstance(batch, (list, tuple)) and all(isinstance(b, Mapping) for b in batch):
            metas = [self._meta(b) for b in batch]
        else:
            raise ValueError(
                f"cannot find the image meta data in engine.state.batch of type {type(batch).__name__}: expected a "
                f"dict or a list of dicts with key {self.image_key!r}, or pass `batch_transform`."
            )
        names: list[Any] = []
        for m in metas:
            fn = m.get("filename_or_obj") if isinstance(m, Mapping) else None
            if fn is None or (isinstance(fn, str) and not fn):
                keys = sorted(m) if isinstance(m, Mapping) else type(m).__name__
                raise ValueError(f"no `filename_or_obj` in the image meta data to name the case; meta has: {keys}.")
            # a collated (not decollated) batch holds one file name per item
            names.extend(fn if isinstance(fn, (list, tuple)) else [fn])
        return names

    def _meta(self, item: Mapping[str, Any]) -> Mapping[str, Any]:
        """Meta data of ``item[image_key]``: a MetaTensor's meta, or the ``<key>_meta_dict`` entry."""
        image = item.get(self.image_key)
        if isinstance(image, MetaTensor):
            return image.meta
        meta = item.get(f"{self.image_key}_meta_dict")
        if isinstance(meta, Mapping):
            return meta
        raise ValueError(
            f"the batch's {self.image_key!r} is {type(image).__name__}, not a MetaTensor, and there is no "
            f"'{self.image_key}_meta_dict'; keys are {sorted(item)}. Set `image_key` or `batch_transform`."
        )

    def __call__(self, engine: Engine) -> None:
        """Write the report (rank 0 only).

        Args:
            engine: the evaluator, after its metrics were computed.

        Raises:
            ValueError: if a metric has no details, the numbers of cases and ids differ, ids repeat, or a
                value is not finite.
        """
        world_size = idist.get_world_size()
        # All ranks take part in the gather; ranks concatenate in order, as the metric details do.
        filenames = string_list_all_gather(strings=self._filenames) if world_size > 1 else self._filenames
        if idist.get_rank() != 0:
            return
        if not filenames:
            raise ValueError("no case was evaluated: the engine produced no batches to report on.")
        case_ids = [case_id_from_path(f) for f in filenames]
        duplicates = sorted(c for c, n in Counter(case_ids).items() if n > 1)
        if duplicates:
            raise ValueError(f"case ids must be unique, these repeat: {duplicates[:10]} (from {len(case_ids)} cases).")

        columns = self._columns(engine, n_cases=len(case_ids))
        for name, values in columns.items():
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise ValueError(
                    f"metric {name!r} is not finite for case(s) {[case_ids[i] for i in bad[:10]]}; "
                    "the report drops nothing silently (for MONAI's DiceMetric use ignore_empty=False)."
                )

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["case_id", *columns])
        for i, case_id in enumerate(case_ids):
            writer.writerow([case_id, *(repr(float(v[i])) for v in columns.values())])
        summary: dict[str, Any] = {name: summarize(values) for name, values in columns.items()}
        summary["n_cases"] = len(case_ids)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.output_dir / self.csv_name, buffer.getvalue())
        _atomic_write_text(self.output_dir / self.summary_name, json.dumps(summary, indent=2, allow_nan=False) + "\n")

    def _columns(self, engine: Engine, n_cases: int) -> dict[str, np.ndarray]:
        """One 1-D array of per-case values per report column."""
        details = getattr(engine.state, "metric_details", None) or {}
        columns: dict[str, np.ndarray] = {}
        for name in self.metric_names:
            if name not in details:
                raise ValueError(
                    f"no per-case values for metric {name!r} in engine.state.metric_details (has {sorted(details)}); "
                    "attach it to the evaluator with save_details=True."
                )
            raw = details[name]
            values = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
            values = values.astype(float).reshape(values.shape[0], -1) if values.ndim else values.reshape(1, 1)
            if values.shape[0] != n_cases:
                raise ValueError(
                    f"metric {name!r} has {values.shape[0]} per-case values but {n_cases} case file names were "
                    f"collected from the batches; check `image_key` / `batch_transform`."
                )
            if values.shape[1] == 1:
                columns[name] = values[:, 0]
            else:
                columns.update({f"{name}_{c}": values[:, c] for c in range(values.shape[1])})
        return columns
