"""nnU-Net v2's default resampling rule for CT, for models imported from nnU-Net: cubic in-plane, nearest across thick slices.

nnU-Net v2 (its default plans) resamples an image to the plan's spacing with a third-order spline, and the
network's logits back to the scan's grid with a first-order one. When either grid is anisotropic (largest
spacing over smallest above 3, with one axis the coarsest), it interpolates only within the planes across that
axis and takes the nearest plane along it, so that thick slices are never blended. Grids are aligned on the
outer edges of their voxels (``scipy.ndimage.zoom(..., grid_mode=True)``), and each interpolated plane (or the
whole volume) is clipped to its input's range, so a spline does not overshoot. The new shape is
``round(shape * spacing / new_spacing)``.

This module is pure numpy / scipy: :class:`dgst_monai.transforms.ResampleAndNormalized` applies it in the
bundles' inference config when ``resampling`` is ``"nnunet"``.

Example::

    axis = thick_axis((0.57, 0.57, 5.0), (0.8, 0.8, 2.5))          # 2: the 5 mm axis
    shape = resampled_shape((202, 202, 64), (0.57, 0.57, 5.0), (0.8, 0.8, 2.5))   # (144, 144, 128)
    image = resample(image, shape, axis, order=3)                  # image: (channels, x, y, z)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["ANISOTROPY_THRESHOLD", "resample", "resampled_shape", "thick_axis", "voxel_map"]

#: a grid is anisotropic when its largest spacing exceeds its smallest by more than this factor (nnU-Net's 3)
ANISOTROPY_THRESHOLD = 3.0


def thick_axis(
    first: Sequence[float], second: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The axis to resample on its own (nearest plane), or None to interpolate all axes together.

    ``first`` decides if it is anisotropic, else ``second``: the source spacing then the target one when
    preprocessing, the other way round when resampling the prediction back. An anisotropic spacing whose coarsest
    value is shared by two or three axes gives None.

    Args:
        first: spacing checked first (mm, one per spatial axis).
        second: spacing checked when ``first`` is not anisotropic.
        threshold: the anisotropy ratio above which a grid counts as anisotropic.
    """
    for spacing in (first, second):
        s = np.asarray(spacing, dtype=float)
        if s.max() / s.min() > threshold:
            coarsest = np.flatnonzero(s.max() / s == 1)
            return int(coarsest[0]) if coarsest.size == 1 else None
    return None


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Spatial shape of a grid of ``shape`` at ``spacing`` resampled to ``new_spacing``: same extent, rounded."""
    return tuple(int(round(n * s / t)) for n, s, t in zip(shape, spacing, new_spacing))


def voxel_map(new_shape: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """The 4x4 matrix taking voxel indices of a resampled grid of ``new_shape`` to those of the grid of ``shape``.

    The two grids share their outer edges: new voxel ``i`` sits at old voxel ``(i + 0.5) * n / m - 0.5``. A
    resampled image's affine is the old affine times this matrix.
    """
    scale = np.divide(shape, new_shape)
    matrix = np.eye(4)
    matrix[:3, :3] = np.diag(scale)
    matrix[:3, 3] = 0.5 * scale - 0.5
    return matrix


def resample(array: np.ndarray, new_shape: Sequence[int], axis: int | None, order: int) -> np.ndarray:
    """Resample a channel-first array to ``new_shape`` (float64 arithmetic, the input's dtype out).

    Args:
        array: ``(channels, *spatial)``.
        new_shape: the spatial shape out.
        axis: spatial axis resampled on its own, by nearest plane (:func:`thick_axis`), or None for all together.
        order: spline order of the interpolation (3 for images, 1 for logits or probabilities).

    Returns:
        ``(channels, *new_shape)``, of ``array``'s dtype.
    """
    shape = array.shape[1:]
    new_shape = tuple(int(n) for n in new_shape)
    if len(new_shape) != len(shape):
        raise ValueError(f"new_shape {new_shape} has {len(new_shape)} axes, the array {len(shape)} spatial axes")
    if tuple(shape) == new_shape:
        return array
    out = np.empty((array.shape[0], *new_shape), dtype=array.dtype)
    for c, channel in enumerate(array.astype(np.float64, copy=False)):
        out[c] = _resample_channel(channel, new_shape, axis, order)
    return out


def _zoom(channel: np.ndarray, new_shape: Sequence[int], order: int, planes_along: int | None) -> np.ndarray:
    """Edge-aligned spline zoom, clipped to the input's range (per plane across ``planes_along``, if given)."""
    zoomed = ndimage.zoom(channel, np.divide(new_shape, channel.shape), order=order, mode="nearest", grid_mode=True)
    if planes_along is None:
        return np.clip(zoomed, channel.min(), channel.max(), out=zoomed)
    others = tuple(a for a in range(channel.ndim) if a != planes_along)
    return np.clip(zoomed, channel.min(axis=others, keepdims=True), channel.max(axis=others, keepdims=True),
                   out=zoomed)


def _resample_channel(channel: np.ndarray, new_shape: tuple[int, ...], axis: int | None, order: int) -> np.ndarray:
    if axis is None:
        return _zoom(channel, new_shape, order, None)
    in_plane = list(new_shape)
    in_plane[axis] = channel.shape[axis]  # the planes keep their number: zoom factor 1 along the axis
    planes = _zoom(channel, in_plane, order, axis)
    n_in, n_out = channel.shape[axis], new_shape[axis]
    if n_in == n_out:
        return planes
    # along the axis: the edge-aligned source coordinate of every output plane, interpolated by scipy itself so
    # that ties (a plane exactly between two) break as in ndimage.map_coordinates
    coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    index = ndimage.map_coordinates(np.arange(n_in, dtype=np.float64), [coords], order=0, mode="nearest")
    return np.take(planes, index.astype(np.intp), axis=axis)
