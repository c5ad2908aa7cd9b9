"""Ignite handler writing an evaluator's per-case metrics (CSV) and their summary (JSON), on MONAI's MetricsSaver."""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import MetricsSaver
from monai.utils import ImageMetaKey, string_list_all_gather

from dgst_monai.data.cases import CASE_ID_KEY, batch_case_ids, case_id_from_path
from dgst_monai.files import atomic_open, atomic_write_json
from dgst_monai.metrics import summarize

__all__ = ["EvaluationReport", "case_id_from_path"]


class EvaluationReport(MetricsSaver):
    """Ignite handler that writes ``per_case_metrics.csv`` and ``summary.json`` when an evaluator's epoch ends.

    It is MONAI's :class:`~monai.handlers.MetricsSaver` (which collects one row label per case at every
    iteration and gathers them across ranks) with our two files instead of MONAI's: rows are named by the
    ``case_id`` each batch carries (every datalist entry has one: :func:`dgst_monai.data.datalists.load_split`),
    so the report names a case exactly as the datalist and ``splits.json`` do. A batch without ``case_id``
    falls back to the id :func:`dgst_monai.data.cases.case_id_from_path` derives from the image's
    ``filename_or_obj``, the same rule that gives datalist entries without one their id.

    Per-case values come from ``engine.state.metric_details`` (filled by MONAI metric handlers with
    ``save_details=True``, e.g. ``MeanDice`` or :class:`dgst_monai.handlers.SurfaceDiceHandler`), shape
    ``(n_cases, n_classes)``. ``per_case_metrics.csv`` has columns ``case_id`` and one per metric
    (``<metric>_<i>`` per class index ``i`` if a metric has several classes). ``summary.json`` is
    ``{<column>: {"mean", "std", "n"}, "n_cases": n}``, the std being the population one (``ddof=0``). Both
    files are written atomically. Non-finite per-case values raise instead of being skipped: with MONAI's
    ``DiceMetric``, use ``ignore_empty=False`` to score empty labels (1.0 / 0.0) rather than NaN.

    Under torch.distributed, case ids are gathered from every rank (metric details are already gathered by
    the metric handlers) and only rank 0 writes. Partition the data without padding (MONAI's
    ``partition_dataset(..., even_divisible=False)``) or padded duplicates will be reported.

    Args:
        output_dir: folder for the two files (created if missing).
        metric_names: names of the engine's metrics to report, e.g. ``["dice", "nsd_1mm"]``.
        image_key: key of the image in the batch, whose meta holds ``filename_or_obj`` (the fallback).
        batch_transform: optional callable returning the case ids (a list of str) of ``engine.state.batch``;
            by default they are read as described above.
        csv_name: file name of the per-case table.
        summary_name: file name of the summary.
        case_key: key of the case id in the batch.

    Example::

        evaluator = SupervisedEvaluator(..., key_val_metric={"dice": MeanDice(..., save_details=True)},
                                        additional_metrics={"nsd_1mm": SurfaceDiceHandler(tolerance_mm=1.0, ...)})
        EvaluationReport(output_dir="eval", metric_names=["dice", "nsd_1mm"]).attach(evaluator)
        evaluator.run()  # writes eval/per_case_metrics.csv and eval/summary.json
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        metric_names: Sequence[str],
        image_key: str = "image",
        batch_transform: Callable[[Any], Sequence[str]] | None = None,
        csv_name: str = "per_case_metrics.csv",
        summary_name: str = "summary.json",
        case_key: str = CASE_ID_KEY,
    ) -> None:
        if isinstance(metric_names, str) or not metric_names:
            raise ValueError(f"`metric_names` must be a non-empty list of metric names, got {metric_names!r}.")
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.image_key = image_key
        self.case_key = case_key
        self.csv_name = csv_name
        self.summary_name = summary_name
        case_ids = batch_transform if batch_transform is not None else self.batch_case_ids
        # MetricsSaver labels each row with the `filename_or_obj` its batch_transform returns: ours is the case id
        super().__init__(
            save_dir=str(self.output_dir),
            metrics=None,
            metric_details=self.metric_names,
            batch_transform=lambda batch: [{ImageMetaKey.FILENAME_OR_OBJ: str(c)} for c in case_ids(batch)],
        )

    def batch_case_ids(self, batch: Any) -> list[str]:
        """The case ids of a batch, collated (dict of lists) or decollated (list of dicts).

        Raises:
            ValueError: a case has neither a ``case_key`` entry nor image meta data with ``filename_or_obj``.
        """
        ids = batch_case_ids(batch, self.case_key)
        if ids is not None:
            return ids
        if isinstance(batch, Mapping):
            names = self._meta(batch).get(ImageMetaKey.FILENAME_OR_OBJ)
            # a collated batch's meta holds one file name per case
            return [self._from_path(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
        if isinstance(batch, (list, tuple)) and all(isinstance(b, Mapping) for b in batch):
            return [i for item in batch for i in self.batch_case_ids(item)]
        raise ValueError(
            f"cannot find the case ids in engine.state.batch of type {type(batch).__name__}: expected a dict or a "
            f"list of dicts with key {self.case_key!r} (or {self.image_key!r} meta data), or pass `batch_transform`."
        )

    def _from_path(self, name: Any) -> str:
        if not name or not isinstance(name, (str, os.PathLike)):
            raise ValueError(
                f"a case has no {self.case_key!r} and its {self.image_key!r} meta data has no `filename_or_obj` "
                f"to name it (found {name!r}); give the datalist entries a `case_id`."
            )
        return case_id_from_path(name)

    def _meta(self, item: Mapping[str, Any]) -> Mapping[str, Any]:
        """Meta data of ``item[image_key]``: a MetaTensor's meta, or the ``<key>_meta_dict`` entry."""
        image = item.get(self.image_key)
        if isinstance(image, MetaTensor):
            return image.meta
        meta = item.get(f"{self.image_key}_meta_dict")
        if isinstance(meta, Mapping):
            return meta
        raise ValueError(
            f"the batch has no {self.case_key!r}, its {self.image_key!r} is {type(image).__name__}, not a MetaTensor, "
            f"and there is no '{self.image_key}_meta_dict'; keys are {sorted(item)}. Give the datalist entries a "
            "`case_id`, or set `image_key` or `batch_transform`."
        )

    def __call__(self, engine: Engine) -> None:
        """Write the report (rank 0 only; every rank takes part in gathering the case ids).

        Args:
            engine: the evaluator, after its metrics were computed.

        Raises:
            ValueError: if a metric has no details, the numbers of cases and ids differ, ids repeat, or a
                value is not finite.
        """
        # ranks concatenate in order, as the metric details do
        case_ids = string_list_all_gather(strings=self._filenames) if idist.get_world_size() > 1 else self._filenames
        if idist.get_rank() != self.save_rank:
            return
        if not case_ids:
            raise ValueError("no case was evaluated: the engine produced no batches to report on.")
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
        summary: dict[str, Any] = {name: summarize(values) for name, values in columns.items()}
        summary["n_cases"] = len(case_ids)

        with atomic_open(self.output_dir / self.csv_name, newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["case_id", *columns])
            for i, case_id in enumerate(case_ids):
                writer.writerow([case_id, *(repr(float(v[i])) for v in columns.values())])
        atomic_write_json(self.output_dir / self.summary_name, summary, allow_nan=False)

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
                    f"metric {name!r} has {values.shape[0]} per-case values but {n_cases} case ids were "
                    f"collected from the batches; check `case_key` / `image_key` / `batch_transform`."
                )
            if values.shape[1] == 1:
                columns[name] = values[:, 0]
            else:
                columns.update({f"{name}_{c}": values[:, c] for c in range(values.shape[1])})
        return columns
