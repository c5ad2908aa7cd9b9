"""Ignite metric handler: normalized surface Dice with each case's physical voxel spacing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler
from monai.utils import MetricReduction

from dgst_monai.metrics import PhysicalSurfaceDiceMetric

__all__ = ["SurfaceDiceHandler"]


def _describe(data: Any) -> str:
    """Short description of what a metric received, for error messages."""
    if isinstance(data, (list, tuple)):
        kinds = sorted({type(d).__name__ for d in data})
        return f"{type(data).__name__} of {len(data)} {'/'.join(kinds) or 'items'}"
    shape = getattr(data, "shape", None)
    return f"{type(data).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")


def _affine_of(data: Any) -> torch.Tensor | None:
    """The affine stored with a MetaTensor (``meta["affine"]``), or None for anything else."""
    if isinstance(data, MetaTensor):
        affine = data.meta.get("affine")
        return None if affine is None else torch.as_tensor(affine, dtype=torch.float64)
    return None


def _spacing_from_affine(affine: torch.Tensor, spatial_dims: int) -> tuple[float, ...]:
    """Voxel size per array axis: the norms of the columns of the affine's linear part."""
    linear = affine[:spatial_dims, :spatial_dims]
    return tuple(float(v) for v in torch.linalg.norm(linear, dim=0))


class SurfaceDiceHandler(IgniteMetricHandler):
    """Normalized surface Dice (NSD) at a tolerance in mm, per case with the case's own voxel spacing.

    MONAI's ``SurfaceDiceMetric`` takes the spacing only as an argument of each call, and no MONAI handler
    passes it: through a handler, a tolerance in mm silently becomes a tolerance in voxels. This handler
    reads every case's spacing from the affine of the label (``y``) MetaTensor, or of the prediction
    (``y_pred``) if the label has none: the spacing is the column norms of the affine's 3x3 part, in
    array-axis order, per batch item. NSD is computed by
    :class:`dgst_monai.metrics.PhysicalSurfaceDiceMetric`, i.e. exactly as :func:`dgst_monai.metrics.surface_dice`
    (MONAI ``compute_surface_dice`` with ``use_subvoxels=True``), with the same empty-case conventions: both
    prediction and label empty -> 1.0, exactly one empty -> 0.0.

    ``y_pred`` and ``y`` must be binarised one-hot MetaTensors, batch-first ``[B, C, X, Y, Z]`` or lists of
    channel-first ``[C, X, Y, Z]`` (MONAI's decollated output, which Ignite hands over one case at a time),
    as for ``MeanDice``. With ``save_details=True``
    the per-case values, shape ``(n_cases, n_classes)``, go to ``engine.state.metric_details[name]`` for
    ``MetricsSaver`` or :class:`dgst_monai.handlers.evaluation_report.EvaluationReport`.

    Args:
        tolerance_mm: accepted boundary deviation in mm, >= 0.
        include_background: whether to score channel 0 as well. Defaults to False.
        output_transform: callable extracting ``(y_pred, y)`` from ``engine.state.output``.
        save_details: whether to store per-case values in ``engine.state.metric_details``.
        reduction: MONAI reduction of the per-case values (``"mean"``, ``"mean_batch"``, ``"none"``, ...).

    Example::

        from monai.handlers import from_engine
        from monai.engines import SupervisedEvaluator

        evaluator = SupervisedEvaluator(
            device=device, val_data_loader=loader, network=net, postprocessing=post,  # one-hot pred and label
            key_val_metric={
                "nsd_1mm": SurfaceDiceHandler(tolerance_mm=1.0, output_transform=from_engine(["pred", "label"]))
            },
        )
        evaluator.run()
        evaluator.state.metrics["nsd_1mm"]  # mean NSD over cases
        evaluator.state.metric_details["nsd_1mm"]  # (n_cases, 1) tensor
    """

    def __init__(
        self,
        tolerance_mm: float = 1.0,
        include_background: bool = False,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
    ) -> None:
        metric_fn = PhysicalSurfaceDiceMetric(
            tolerance_mm=tolerance_mm, include_background=include_background, reduction=reduction
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Compute and buffer the NSD of every case of one iteration.

        Args:
            output: ``(y_pred, y)``, each a batch-first MetaTensor or a list of channel-first MetaTensors.

        Raises:
            ValueError: if ``output`` is not a pair, batch sizes differ, or no affine is found on ``y``/``y_pred``.
        """
        if len(output) != 2:
            raise ValueError(f"output must be the pair (y_pred, y), got {len(output)} item(s).")
        y_pred, y = output
        preds, labels = self._items(y_pred, "y_pred"), self._items(y, "y")
        if len(preds) != len(labels):
            raise ValueError(f"y_pred and y hold different numbers of cases: {len(preds)} and {len(labels)}.")
        spacings = self._case_spacings(y_pred, y, len(preds), spatial_dims=preds[0].ndim - 1)
        # One call per case: decollated cases may differ in shape, and each has its own spacing.
        for pred, label, spacing in zip(preds, labels, spacings):
            self.metric_fn(pred.unsqueeze(0), label.unsqueeze(0), spacing=spacing)

    @staticmethod
    def _items(data: Any, name: str) -> list[torch.Tensor]:
        """Split a batch-first tensor or a list of channel-first tensors into channel-first cases."""
        if isinstance(data, (list, tuple)):
            items = list(data)
        elif isinstance(data, torch.Tensor):
            # Iterate over the batch dimension of the raw tensor: slicing a MetaTensor also slices its meta.
            items = list(data.as_tensor() if isinstance(data, MetaTensor) else data)
        else:
            raise ValueError(
                f"{name} must be a batch-first tensor or a list of channel-first tensors, got {_describe(data)}."
            )
        if not items or not all(isinstance(i, torch.Tensor) and i.ndim == 4 for i in items):
            raise ValueError(
                f"{name} must hold one-hot 3-D cases of shape [C, X, Y, Z] (batch-first [B, C, X, Y, Z] or a list), "
                f"got {_describe(data)} with item shapes {[tuple(getattr(i, 'shape', ())) for i in items]}."
            )
        # Plain tensors from here on: the geometry is read separately, and slicing meta along is wasted work.
        return [i.as_tensor() if isinstance(i, MetaTensor) else i for i in items]

    @staticmethod
    def _case_spacings(y_pred: Any, y: Any, n_cases: int, spatial_dims: int) -> list[tuple[float, ...]]:
        """Per-case spacing from the affines of ``y`` (preferred) or ``y_pred``."""
        for data in (y, y_pred):
            if isinstance(data, (list, tuple)):
                affines = [_affine_of(d) for d in data]
                if all(a is not None for a in affines):
                    return [_spacing_from_affine(a, spatial_dims) for a in affines]  # type: ignore[arg-type]
            else:
                affine = _affine_of(data)
                if affine is not None:
                    if affine.ndim == 2:  # one affine for the whole batch
                        return [_spacing_from_affine(affine, spatial_dims)] * n_cases
                    if affine.ndim == 3 and affine.shape[0] == n_cases:  # collated: one per item
                        return [_spacing_from_affine(a, spatial_dims) for a in affine]
                    raise ValueError(
                        f"the affine of a batch of {n_cases} cases has shape {tuple(affine.shape)}; "
                        f"expected (4, 4) or ({n_cases}, 4, 4)."
                    )
        raise ValueError(
            "SurfaceDiceHandler needs each case's voxel spacing, read from the affine of `y` or `y_pred` "
            f"(MetaTensor meta['affine']), but got y: {_describe(y)} and y_pred: {_describe(y_pred)}. "
            "Keep MetaTensors through the pipeline (LoadImaged and MONAI transforms do; "
            "ToNumpyd or track_meta=False drop the geometry)."
        )

