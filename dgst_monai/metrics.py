"""Segmentation metrics: Dice and normalized surface Dice (NSD) in millimetres, and their summaries.

Pure numpy / MONAI, no training code. Both metrics share one empty-case convention:

* prediction and label both empty -> 1.0 (nothing to find, nothing found: a perfect answer);
* exactly one of them empty -> 0.0;

so that every case yields a finite number and case means are over all cases. (MONAI's own
``compute_surface_dice`` returns NaN when both are empty, which its reductions then silently skip.)

NSD follows the standard definition of Nikolov et al. (DeepMind's ``surface-distance``): the surface is
made of surface elements on the voxel-corner grid with their areas, and NSD is the area of both surfaces
lying within ``tolerance_mm`` of the other surface, divided by the total area. It is computed by MONAI's
``compute_surface_dice(..., use_subvoxels=True)``, which matches that reference; MONAI's default
(``use_subvoxels=False``, counting edge voxels) does not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, compute_surface_dice
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = ["PhysicalSurfaceDiceMetric", "dice", "summarize", "surface_dice"]

ArrayLike = np.ndarray | torch.Tensor


def _as_binary_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a boolean numpy array, refusing anything but booleans or 0/1 values."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ValueError(f"`{name}` must be a numpy array or torch tensor, got {type(x).__name__}.")
    if x.dtype == bool:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"`{name}` must be boolean or numeric 0/1, got dtype {x.dtype}.")
    # Probabilities or label maps with several classes would otherwise be binarised silently.
    if np.any((x != 0) & (x != 1)):
        bad = np.unique(x[(x != 0) & (x != 1)])[:5]
        raise ValueError(f"`{name}` must contain only 0 and 1 (a binary mask), found values such as {bad.tolist()}.")
    return x != 0


def _check_pair(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert a prediction / label pair of 3-D binary masks."""
    p = _as_binary_numpy(pred, "pred")
    g = _as_binary_numpy(label, "label")
    if p.ndim != 3 or g.ndim != 3:
        raise ValueError(f"`pred` and `label` must be 3-D masks, got shapes {p.shape} (pred) and {g.shape} (label).")
    if p.shape != g.shape:
        raise ValueError(f"`pred` and `label` must have the same shape, got {p.shape} (pred) and {g.shape} (label).")
    return p, g


def _check_spacing(spacing: Any, ndim: int = 3) -> tuple[float, ...]:
    """Validate a voxel spacing in millimetres, one positive finite value per array axis."""
    message = f"`spacing` must be {ndim} positive finite numbers (mm, array-axis order), got {spacing!r}."
    try:
        arr = np.asarray(spacing, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if arr.shape != (ndim,) or not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(message)
    return tuple(float(v) for v in arr)


def _check_tolerance(tolerance_mm: Any) -> float:
    """Validate an NSD tolerance in millimetres."""
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError):
        raise ValueError(f"`tolerance_mm` must be a number >= 0, got {tolerance_mm!r}.") from None
    if not math.isfinite(tol) or tol < 0:
        raise ValueError(f"`tolerance_mm` must be a finite number >= 0, got {tolerance_mm!r}.")
    return tol


def _nsd_masks(pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    """NSD of two validated boolean masks: the one place where the formula and empty cases are decided."""
    pred_any, label_any = bool(pred.any()), bool(label.any())
    if not pred_any and not label_any:
        return 1.0
    if pred_any != label_any:
        return 0.0
    # One-hot (batch 1, background + foreground) as compute_surface_dice expects; bool keeps it small.
    y_pred = torch.stack([~pred, pred])[None]
    y = torch.stack([~label, label])[None]
    with warnings.catch_warnings():
        # MONAI 1.6.1 passes its own deprecated `always_return_as_numpy` argument internally; nothing to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        nsd = compute_surface_dice(
            y_pred=y_pred,
            y=y,
            class_thresholds=[tolerance_mm],
            include_background=False,
            spacing=list(spacing),
            use_subvoxels=True,
        )
    return float(nsd[0, 0])


def dice(pred: ArrayLike, label: ArrayLike) -> float:
    """Dice similarity coefficient of two 3-D binary masks, ``2 |P & L| / (|P| + |L|)``.

    Empty cases: both masks empty -> 1.0; exactly one empty -> 0.0.

    Args:
        pred: predicted mask, boolean or 0/1 values, 3-D.
        label: reference mask, same shape as ``pred``.

    Returns:
        The Dice coefficient in [0, 1].

    Raises:
        ValueError: if a mask is not 3-D, not binary, or the shapes differ.

    Example::

        dice(pred_mask, label_mask)  # 0.87
    """
    p, g = _check_pair(pred, label)
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def surface_dice(pred: ArrayLike, label: ArrayLike, spacing: Sequence[float], tolerance_mm: float = 1.0) -> float:
    """Normalized surface Dice (NSD) of two 3-D binary masks at a tolerance in millimetres.

    Computed by MONAI's ``compute_surface_dice`` with ``use_subvoxels=True`` (surface elements with areas,
    as in DeepMind's reference implementation). A surface element counts as correct if its distance to the
    other surface is ``<= tolerance_mm``.

    Empty cases: both masks empty -> 1.0; exactly one empty -> 0.0.

    Args:
        pred: predicted mask, boolean or 0/1 values, 3-D.
        label: reference mask, same shape as ``pred``.
        spacing: voxel size in mm for each array axis, in array-axis order (not necessarily x, y, z).
        tolerance_mm: accepted boundary deviation in mm, >= 0.

    Returns:
        The NSD in [0, 1].

    Raises:
        ValueError: if a mask is not 3-D, not binary, the shapes differ, ``spacing`` is not three positive
            numbers, or ``tolerance_mm`` is negative.

    Example::

        surface_dice(pred_mask, label_mask, spacing=(0.9, 0.9, 3.0), tolerance_mm=1.0)
    """
    p, g = _check_pair(pred, label)
    sp = _check_spacing(spacing, ndim=3)
    tol = _check_tolerance(tolerance_mm)
    return _nsd_masks(torch.from_numpy(p), torch.from_numpy(g), sp, tol)


class PhysicalSurfaceDiceMetric(CumulativeIterationMetric):
    """NSD per case and class with a tolerance in mm and each case's own voxel spacing.

    Same computation and empty-case conventions as :func:`surface_dice` (both empty -> 1.0, one empty -> 0.0,
    so the buffer never holds NaN). Inputs are one-hot, binarised, batch-first tensors ``[B, C, X, Y, Z]``;
    ``spacing`` (mm, array-axis order) must be passed with every call, either one sequence for the whole batch
    or one per batch item. (For lists of channel-first tensors MONAI passes the same ``spacing`` to every item,
    so only a single one fits.) :class:`dgst_monai.handlers.surface_dice.SurfaceDiceHandler` reads it from
    each case's affine.

    Args:
        tolerance_mm: accepted boundary deviation in mm, >= 0.
        include_background: whether channel 0 is scored too.
        reduction: MONAI reduction mode for :meth:`aggregate` (``"mean"``, ``"mean_batch"``, ``"none"``, ...).
        get_not_nans: whether :meth:`aggregate` also returns the not-NaN counts.

    Example::

        metric = PhysicalSurfaceDiceMetric(tolerance_mm=1.0)
        metric(y_pred_onehot, y_onehot, spacing=[(0.9, 0.9, 3.0), (0.7, 0.7, 2.5)])
        metric.aggregate()  # mean NSD
    """

    def __init__(
        self,
        tolerance_mm: float = 1.0,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.tolerance_mm = _check_tolerance(tolerance_mm)
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Return NSD values of shape ``[B, C']`` (``C' = C - 1`` without background)."""
        if y is None:
            raise ValueError("PhysicalSurfaceDiceMetric needs the label `y`, got None.")
        y_pred, y = torch.as_tensor(y_pred), torch.as_tensor(y)
        if y_pred.shape != y.shape:
            raise ValueError(
                f"y_pred and y must have the same one-hot shape [B, C, X, Y, Z], got {tuple(y_pred.shape)} (y_pred) "
                f"and {tuple(y.shape)} (y); one-hot both, e.g. with AsDiscreted(argmax=True, to_onehot=2)."
            )
        if y_pred.ndim != 5:
            raise ValueError(f"y_pred and y must be 3-D one-hot batches [B, C, X, Y, Z], got shape {tuple(y.shape)}.")
        first = 0 if self.include_background else 1
        if y_pred.shape[1] <= first:
            raise ValueError(
                f"y_pred and y have {y_pred.shape[1]} channel(s), so no foreground class is left with "
                f"include_background={self.include_background}; they must be one-hot (e.g. AsDiscreted(to_onehot=2))."
            )
        spacings = self._batch_spacing(kwargs.get("spacing"), y_pred.shape[0])
        pred_b = _as_binary_numpy(y_pred, "y_pred")
        label_b = _as_binary_numpy(y, "y")
        out = torch.empty((y_pred.shape[0], y_pred.shape[1] - first), dtype=torch.float32)
        for b in range(y_pred.shape[0]):
            for c in range(first, y_pred.shape[1]):
                out[b, c - first] = _nsd_masks(
                    torch.from_numpy(pred_b[b, c]), torch.from_numpy(label_b[b, c]), spacings[b], self.tolerance_mm
                )
        return out.to(y_pred.device)

    @staticmethod
    def _batch_spacing(spacing: Any, batch_size: int) -> list[tuple[float, ...]]:
        """One validated spacing per batch item from a single spacing or a per-item sequence."""
        if spacing is None:
            raise ValueError(
                "PhysicalSurfaceDiceMetric needs `spacing=` (mm, array-axis order) with every call: "
                "a tolerance in mm is meaningless without the voxel size."
            )
        arr = np.asarray(spacing, dtype=float)
        if arr.ndim == 1:
            return [_check_spacing(arr)] * batch_size
        if arr.ndim == 2 and arr.shape[0] == batch_size:
            return [_check_spacing(row) for row in arr]
        raise ValueError(
            f"`spacing` must be 3 numbers or one triple per batch item ({batch_size}), got shape {arr.shape}."
        )

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered per-case values with ``reduction`` (default: the constructor's)."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the buffered data to aggregate must be a torch.Tensor, got {type(data).__name__}.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


def summarize(values: Iterable[float] | np.ndarray) -> dict[str, float | int]:
    """Mean, standard deviation and count of per-case metric values.

    The standard deviation is the population one (``ddof=0``, numpy's default), as the paper's
    "mean +- std over test cases". Nothing is dropped: NaN or infinite values raise.

    Args:
        values: one value per case (1-D).

    Returns:
        ``{"mean": float, "std": float, "n": int}``.

    Raises:
        ValueError: if ``values`` is empty, not 1-D, or holds NaN / infinite values.

    Example::

        summarize([0.8, 0.6])  # {"mean": 0.7, "std": 0.1, "n": 2}
    """
    arr = np.asarray(list(values) if not isinstance(values, (np.ndarray, torch.Tensor)) else values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"`values` must be 1-D (one value per case), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError("`values` is empty: there is nothing to summarize.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"`values` holds {bad.size} non-finite value(s) at index {bad[:10].tolist()} "
            f"({arr[bad[:10]].tolist()}); they are not dropped silently."
        )
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=0)), "n": int(arr.size)}
