"""Small CT-like volumes and writers (NIfTI / NRRD / DICOM series) for the data tests.

Arrays here are (x, y, z); SimpleITK wants (z, y, x), so every writer transposes. Geometry is given in LPS,
as ITK and DICOM use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

SHAPE = (32, 32, 16)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (-12.5, 30.0, -210.0)


def rotation_z(degrees: float) -> tuple[float, ...]:
    """Row-major 3x3 direction: a rotation about the LPS z axis (an oblique in-plane orientation)."""
    t = np.deg2rad(degrees)
    return tuple(np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]]).ravel())


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def ct_volume(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An int16 HU volume (air around a soft-tissue body with fat and a bone) and a uint8 label (one node)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    r = np.hypot((x - cx) / (shape[0] * 0.42), (y - cy) / (shape[1] * 0.38))
    hu = np.full(shape, -1000.0)
    hu[r < 1.0] = -100.0  # fat
    hu[r < 0.8] = 40.0  # soft tissue
    hu[(np.hypot(x - cx, y - cy * 1.5) < 3)] = 700.0  # bone
    hu += rng.normal(0, 10, shape)
    label = np.zeros(shape, dtype=np.uint8)
    node = (slice(8, 13), slice(9, 14), slice(5, 9))
    label[node] = 1
    hu[node] = 30.0 + rng.normal(0, 5, label[node].shape)
    return np.rint(hu).astype(np.int16), label


def to_sitk(
    array: np.ndarray,
    spacing: tuple[float, ...] = SPACING,
    origin: tuple[float, ...] = ORIGIN,
    direction: tuple[float, ...] = IDENTITY,
) -> sitk.Image:
    """A SimpleITK image of an (x, y, z) array with the given LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


def write(path: Path, array: np.ndarray, **geometry: Any) -> Path:
    """Write an (x, y, z) array with SimpleITK (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_sitk(array, **geometry), str(path))
    return path


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = ORIGIN,
    direction: tuple[float, ...] = IDENTITY,
    skip: tuple[int, ...] = (),
    series_uid: str = "1.2.826.0.1.3680043.8.498.1.2",
) -> Path:
    """Write an (x, y, z) HU volume as a CT DICOM series, one file per slice, with full geometry tags.

    Each slice carries ImagePositionPatient (origin + k * slice spacing along the normal),
    ImageOrientationPatient (row and column cosines), PixelSpacing (row spacing \\ column spacing),
    SliceThickness, and RescaleIntercept -1024 / RescaleSlope 1: GDCM stores HU + 1024 and applies the
    rescale when reading. ``skip`` leaves slices out (a series with a gap).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rot = np.asarray(direction, dtype=float).reshape(3, 3)
    study_uid = series_uid.rsplit(".", 1)[0]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[2]):
        if k in skip:
            continue
        position = np.asarray(origin) + rot[:, 2] * spacing[2] * k
        # A one-slice 3-D image keeps the geometry; GDCM writes it into the tags below as well.
        sl = to_sitk(hu[:, :, k : k + 1], spacing=spacing, origin=tuple(position), direction=direction)
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0010|0010": "Phantom^Test",
            "0010|0020": "P001",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.concatenate([rot[:, 0], rot[:, 1]])),
            "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",
            "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def write_datalist(
    path: Path, training: list[dict[str, Any]], test: list[dict[str, Any]] | None = None, **extra: Any
) -> Path:
    """A MONAI datalist JSON (paths as given)."""
    content = {"labels": {"0": "background", "1": "lymph_node"}, "training": training, "test": test or [], **extra}
    path.write_text(json.dumps(content, indent=2), encoding="utf-8")
    return path


def lps_geometry_to_ras(
    spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]
) -> np.ndarray:
    """Reference voxel-to-RAS affine of an LPS geometry, written out independently of the library."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) * np.asarray(spacing, dtype=float)[None, :]
    m[:3, 3] = origin
    m[0, :] *= -1.0  # L -> R
    m[1, :] *= -1.0  # P -> A
    return m
