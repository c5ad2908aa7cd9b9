"""Segmentation metrics: Dice, normalized surface Dice (NSD) in millimetres, lymph-node detection, summaries.

Pure numpy / scipy / MONAI, no training code. Dice and NSD share one empty-case convention:

* prediction and label both empty -> 1.0 (nothing to find, nothing found: a perfect answer);
* exactly one of them empty -> 0.0;

so that every case yields a finite number and case means are over all cases. (MONAI's own
``compute_surface_dice`` returns NaN when both are empty, which its reductions then silently skip.)

NSD follows the standard definition of Nikolov et al. (DeepMind's ``surface-distance``): the surface is
made of surface elements on the voxel-corner grid with their areas, and NSD is the area of both surfaces
lying within ``tolerance_mm`` of the other surface, divided by the total area. It is computed by MONAI's
``compute_surface_dice(..., use_subvoxels=True)``, which matches that reference; MONAI's default
(``use_subvoxels=False``, counting edge voxels) does not.

Lymph-node-level metrics (:func:`node_metrics`, pooled over cases by :func:`summarize_nodes`) count nodes, as
clinicians do: connected components of prediction and reference, matched by overlap, with per-node recall,
precision, F1 and false positives per volume, split by short axis (< 10 mm / >= 10 mm, measured in mm in the
axial plane), and the volume error of the whole mask.
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
from scipy import ndimage
from scipy.spatial import ConvexHull

__all__ = [
    "NODE_SIZE_CLASSES",
    "PhysicalSurfaceDiceMetric",
    "connected_nodes",
    "dice",
    "node_metrics",
    "short_axis_mm",
    "summarize",
    "summarize_nodes",
    "surface_dice",
]

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


# ---------------------------------------------------------------------------------------------------------
# Lymph-node detection
# ---------------------------------------------------------------------------------------------------------

#: Node size classes of the node-level metrics, by short axis: the usual clinical threshold is 10 mm.
NODE_SIZE_CLASSES: tuple[str, ...] = ("all", "lt10", "ge10")

_CONNECTIVITY = {6: 1, 18: 2, 26: 3}  # neighbours -> scipy's connectivity rank


def _check_axial_axis(axial_axis: Any) -> int:
    if isinstance(axial_axis, bool) or axial_axis not in (0, 1, 2):
        raise ValueError(f"`axial_axis` must be the array axis across axial slices (0, 1 or 2), got {axial_axis!r}.")
    return int(axial_axis)


def _min_width_mm(pixels: np.ndarray, pixel_mm: tuple[float, float]) -> float:
    """Smallest caliper width (minimum Feret diameter) in mm of a set of pixels ``(n, 2)`` of one slice.

    Each pixel is a ``pixel_mm`` rectangle, so the width is that of the convex hull of all pixel corners: the
    smallest, over the hull's edges, of the largest distance of a hull vertex from the edge's line (rotating
    calipers; the minimum width of a convex polygon is attained perpendicular to one of its edges).
    """
    h = np.asarray(pixel_mm, dtype=float) / 2.0
    centres = pixels.astype(float) * np.asarray(pixel_mm, dtype=float)
    corners = (centres[:, None, :] + np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * h).reshape(-1, 2)
    corners = np.unique(corners, axis=0)
    hull = corners[ConvexHull(corners).vertices]
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / np.linalg.norm(edges, axis=1, keepdims=True)
    distances = (hull @ normals.T) - np.einsum("ij,ij->i", hull, normals)[None, :]  # vertex x edge
    return float(np.abs(distances).max(axis=0).min())


def short_axis_mm(node: np.ndarray, spacing: Sequence[float], axial_axis: int = 2) -> float:
    """Short axis of one lymph node in mm: its largest minimum in-plane width over the axial slices.

    On every axial slice the node's cross-section is measured by its minimum caliper width (the minimum Feret
    diameter, with each voxel counted as its full ``spacing`` rectangle); the node's short axis is the largest
    of these, i.e. the width on the slice where the node is widest, as a radiologist measures it (the slice
    thickness does not enter: the extent across slices is not the short axis).

    Args:
        node: 3-D boolean mask of the node (any shape; only its voxels matter).
        spacing: voxel size in mm per array axis.
        axial_axis: the array axis across axial slices (2 for (x, y, z) arrays such as NIfTI in RAS / LPS).

    Returns:
        The short axis in mm (0.0 for an empty mask).

    Example::

        short_axis_mm(label == 1, spacing=(0.9, 0.9, 3.0))  # e.g. 11.7
    """
    mask = np.asarray(node, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"`node` must be a 3-D mask, got shape {mask.shape}.")
    sp = _check_spacing(spacing, ndim=3)
    axis = _check_axial_axis(axial_axis)
    in_plane = tuple(a for a in range(3) if a != axis)
    pixel_mm = (sp[in_plane[0]], sp[in_plane[1]])
    coords = np.argwhere(mask)
    if coords.size == 0:
        return 0.0
    widths = [
        _min_width_mm(coords[coords[:, axis] == k][:, list(in_plane)], pixel_mm) for k in np.unique(coords[:, axis])
    ]
    return max(widths)


def connected_nodes(mask: Any, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3-D binary mask: ``(labels, n)`` with labels ``1..n`` (0 background).

    Args:
        mask: 3-D binary mask (boolean or 0/1).
        connectivity: voxel neighbourhood, 6 (faces), 18 (faces and edges) or 26 (faces, edges and corners).

    Example::

        labels, n = connected_nodes(label_mask)
    """
    if connectivity not in _CONNECTIVITY:
        raise ValueError(f"`connectivity` must be 6, 18 or 26, got {connectivity!r}.")
    m = _as_binary_numpy(mask, "mask")
    if m.ndim != 3:
        raise ValueError(f"`mask` must be 3-D, got shape {m.shape}.")
    labels, n = ndimage.label(m, structure=ndimage.generate_binary_structure(3, _CONNECTIVITY[connectivity]))
    return labels, int(n)


def _size_class(short_axis: float, threshold_mm: float) -> str:
    return "ge10" if short_axis >= threshold_mm else "lt10"


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _f1(recall: float, precision: float, n_reference: float, n_predicted: float) -> float:
    """F1 of recall and precision; nothing to find and nothing found is 1.0, exactly one side empty 0.0."""
    if not n_reference and not n_predicted:
        return 1.0
    if not n_reference or not n_predicted:
        return 0.0
    return 0.0 if recall + precision == 0 else 2.0 * recall * precision / (recall + precision)


def _detection_scores(counts: dict[str, float], suffix: str, n_volumes: int) -> dict[str, float]:
    """Recall, precision, F1 and false positives per volume from the counts of one size class."""
    gt, hit = counts[f"gt_nodes{suffix}"], counts[f"detected{suffix}"]
    pred, true = counts[f"pred_nodes{suffix}"], counts[f"pred_true{suffix}"]
    recall, precision = _ratio(hit, gt), _ratio(true, pred)
    return {
        f"node_recall{suffix}": recall,
        f"node_precision{suffix}": precision,
        f"node_f1{suffix}": _f1(recall, precision, gt, pred),
        f"fp_per_volume{suffix}": (pred - true) / n_volumes,
    }


def node_metrics(
    pred: ArrayLike,
    label: ArrayLike,
    spacing: Sequence[float],
    *,
    axial_axis: int = 2,
    size_threshold_mm: float = 10.0,
    connectivity: int = 26,
) -> dict[str, float]:
    """Lymph-node detection and volume error of one case: nodes are connected components, matched by overlap.

    Matching: a reference node is *detected* if at least one voxel of it is predicted; a predicted component is
    *true* if it overlaps a reference node, otherwise it is a false positive. Several nodes merged into one
    predicted component are all detected (and that component is one true prediction, counted in
    ``merged``); a node split into several predicted components is detected once (each piece is a true
    prediction, the node is counted in ``split``). Each node is classed by its own short axis
    (:func:`short_axis_mm`): ``lt10`` below ``size_threshold_mm``, ``ge10`` at or above it; reference nodes by
    theirs (recall), predicted components by theirs (precision, false positives).

    Returned keys, for every size class suffix ``""`` (all), ``"_lt10"``, ``"_ge10"``: the counts
    ``gt_nodes``, ``detected``, ``pred_nodes``, ``pred_true``; ``node_recall = detected / gt_nodes`` and
    ``node_precision = pred_true / pred_nodes`` (NaN when the denominator is 0), ``node_f1`` (their harmonic
    mean; 1.0 when there are neither reference nor predicted nodes, 0.0 when exactly one side has none),
    ``fp_per_volume`` (false positives of this case). Then ``merged``, ``split``, ``volume_pred_ml``,
    ``volume_gt_ml``, ``abs_volume_error_ml = |V_pred - V_gt|`` and ``rel_volume_error = |V_pred - V_gt| /
    V_gt`` (NaN when the reference is empty). :func:`summarize_nodes` pools the counts over cases.

    Args:
        pred: predicted mask, boolean or 0/1, 3-D.
        label: reference mask, same shape.
        spacing: voxel size in mm per array axis.
        axial_axis: the array axis across axial slices (2 for NIfTI-style (x, y, z) arrays).
        size_threshold_mm: short axis separating small from large nodes (10 mm: the usual clinical threshold).
        connectivity: 6, 18 or 26 (see :func:`connected_nodes`).

    Returns:
        The metrics above (floats).

    Raises:
        ValueError: masks not 3-D, not binary or of different shapes; a bad spacing, axis or connectivity.

    Example::

        m = node_metrics(pred_mask, label_mask, spacing=(0.9, 0.9, 3.0))
        m["node_recall_ge10"], m["fp_per_volume"]
    """
    p, g = _check_pair(pred, label)
    sp = _check_spacing(spacing, ndim=3)
    axis = _check_axial_axis(axial_axis)
    threshold = _number_in_mm(size_threshold_mm, "size_threshold_mm")
    p_lab, n_p = connected_nodes(p, connectivity)
    g_lab, n_g = connected_nodes(g, connectivity)

    # overlap pairs (reference node, predicted component), from the voxels both masks share
    both = (g_lab > 0) & (p_lab > 0)
    pairs = np.unique(np.stack([g_lab[both], p_lab[both]], axis=1), axis=0) if both.any() else np.zeros((0, 2), int)
    hits_per_gt = np.bincount(pairs[:, 0], minlength=n_g + 1)
    hits_per_pred = np.bincount(pairs[:, 1], minlength=n_p + 1)

    def classes(labels: np.ndarray, n: int) -> list[str]:
        boxes = ndimage.find_objects(labels, max_label=n)
        return [
            _size_class(short_axis_mm(labels[box] == i + 1, sp, axis), threshold) for i, box in enumerate(boxes)
        ]

    g_class, p_class = classes(g_lab, n_g), classes(p_lab, n_p)
    counts: dict[str, float] = {}
    for size in NODE_SIZE_CLASSES:
        suffix = "" if size == "all" else f"_{size}"
        g_in = [i for i in range(n_g) if size == "all" or g_class[i] == size]
        p_in = [i for i in range(n_p) if size == "all" or p_class[i] == size]
        counts[f"gt_nodes{suffix}"] = float(len(g_in))
        counts[f"detected{suffix}"] = float(sum(hits_per_gt[i + 1] > 0 for i in g_in))
        counts[f"pred_nodes{suffix}"] = float(len(p_in))
        counts[f"pred_true{suffix}"] = float(sum(hits_per_pred[i + 1] > 0 for i in p_in))
    out = dict(counts)
    for size in NODE_SIZE_CLASSES:
        out.update(_detection_scores(counts, "" if size == "all" else f"_{size}", n_volumes=1))
    voxel_ml = math.prod(sp) / 1000.0
    v_pred, v_gt = float(p.sum()) * voxel_ml, float(g.sum()) * voxel_ml
    out.update(
        merged=float(np.sum(hits_per_pred[1:] > 1)),
        split=float(np.sum(hits_per_gt[1:] > 1)),
        volume_pred_ml=v_pred,
        volume_gt_ml=v_gt,
        abs_volume_error_ml=abs(v_pred - v_gt),
        rel_volume_error=_ratio(abs(v_pred - v_gt), v_gt),
    )
    return out


def _number_in_mm(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive number of mm, got {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a positive number of mm, got {value!r}.")
    return v


#: The count keys of :func:`node_metrics`, which :func:`summarize_nodes` adds up over cases.
_NODE_COUNTS = tuple(
    f"{kind}{'' if size == 'all' else '_' + size}"
    for size in NODE_SIZE_CLASSES
    for kind in ("gt_nodes", "detected", "pred_nodes", "pred_true")
)


def summarize_nodes(cases: Iterable[dict[str, float]]) -> dict[str, float]:
    """Pool :func:`node_metrics` of several cases: detection over all their nodes, volume errors averaged.

    Recall, precision and F1 of each size class are computed from the counts summed over the cases (every node
    weighs the same, the usual practice for "recall of nodes >= 10 mm"), false positives per volume are the
    summed false positives divided by the number of cases, and the volume errors are means over the cases
    (the relative one over the cases with a non-empty reference).

    Args:
        cases: one :func:`node_metrics` result per case.

    Returns:
        The summed counts, the pooled ``node_recall* / node_precision* / node_f1* / fp_per_volume*``,
        ``abs_volume_error_ml``, ``rel_volume_error`` (NaN if no case has a reference node) and ``n_cases``.

    Raises:
        ValueError: no cases, or a case without the count keys.

    Example::

        summarize_nodes([node_metrics(p, g, spacing) for p, g, spacing in cases])["node_recall_ge10"]
    """
    rows = list(cases)
    if not rows:
        raise ValueError("no cases to summarize")
    missing = sorted({k for row in rows for k in _NODE_COUNTS if k not in row})
    if missing:
        raise ValueError(f"node metrics lack the count keys {missing[:5]}: pass results of node_metrics().")
    counts = {k: float(sum(row[k] for row in rows)) for k in _NODE_COUNTS}
    out: dict[str, float] = dict(counts)
    for size in NODE_SIZE_CLASSES:
        out.update(_detection_scores(counts, "" if size == "all" else f"_{size}", n_volumes=len(rows)))
    rel = [row["rel_volume_error"] for row in rows if math.isfinite(row["rel_volume_error"])]
    out["abs_volume_error_ml"] = float(np.mean([row["abs_volume_error_ml"] for row in rows]))
    out["rel_volume_error"] = float(np.mean(rel)) if rel else math.nan
    out["n_cases"] = float(len(rows))
    return out
