"""A lymph-node mask back into the clinic: DICOM-SEG for the PACS and viewers, RTSTRUCT for the planning system.

:func:`mask_to_dicom` is what ``dgst-monai data to-dicom``, ``dgst-monai predict --format`` and the bundles'
``output_format`` use. The mask must lie on the series' voxel grid: any volume file (or SimpleITK image) whose
voxels are the series' voxels, in any axis order or orientation (a NIfTI the bundle wrote in RAS, say), is
mapped onto the series exactly; anything that would need resampling is refused with both geometries named.

Both objects reference the source series (study, series, frame of reference and every source image), carry its
patient and study attributes (Type 2 ones present, empty where the source lacks them) and get new UIDs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dgst_monai.dicom.series import CTSeries, DicomError, Grid, scan

__all__ = ["DICOM_FORMATS", "DicomOutput", "load_series", "mask_on_grid", "mask_to_dicom", "parse_formats", "save_dicom"]

#: the DICOM formats a mask can be written in (``nifti`` is the bundles' own volume file)
DICOM_FORMATS = ("dicom-seg", "rtstruct")
SEG_SERIES_OFFSET, RTSTRUCT_SERIES_OFFSET = 1000, 2000


def parse_formats(value: str | Sequence[str], allowed: Sequence[str] = ("nifti", *DICOM_FORMATS)) -> tuple[str, ...]:
    """``"nifti,dicom-seg"`` or ``["rtstruct"]`` -> a tuple of known format names, in the order given.

    Raises:
        DicomError: an unknown or repeated name, or none.
    """
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    formats = tuple(i.strip().lower() for i in items if i.strip())
    unknown = [f for f in formats if f not in allowed]
    if unknown or not formats or len(set(formats)) != len(formats):
        raise DicomError(f"output format(s) must be a comma-separated list of {', '.join(allowed)}, got {value!r}")
    return formats


def load_series(folder: str | os.PathLike[str]) -> CTSeries:
    """The one regular CT series in ``folder`` (any depth).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        DicomError: no DICOM CT series there (naming what was found), several, or one that is not a regular
            volume (tilted, irregular spacing).
    """
    found = scan(folder)
    if not found.series:
        what = ", ".join(f"{n} {k}" for k, n in sorted(found.other.items()))
        extra = f"; found {what}" if what else ""
        extra += f"; {found.not_dicom} non-DICOM file(s)" if found.not_dicom else ""
        damaged = f"; unreadable: {found.unreadable[0][0]} ({found.unreadable[0][1]})" if found.unreadable else ""
        raise DicomError(f"{folder} is not a DICOM CT series: no CT image found{extra}{damaged}")
    if len(found.series) > 1:
        names = "; ".join(s.description for s in found.series.values())
        raise DicomError(f"{folder} holds {len(found.series)} CT series ({names}); point --series at one of them")
    series = next(iter(found.series.values()))
    if series.problems:
        raise DicomError(f"{series.description}: {'; '.join(series.problems)}")
    return series


def _sitk_matrix(image: sitk.Image) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) @ np.diag(image.GetSpacing())
    out[:3, 3] = image.GetOrigin()
    return out


def mask_on_grid(image: sitk.Image, grid: Grid, name: str) -> np.ndarray:
    """The voxels of ``image`` as a boolean (slices, rows, columns) array on ``grid``, without resampling.

    Raises:
        DicomError: ``image`` is not 3-D, or its voxels are not the grid's (naming ``name`` and both geometries).
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DicomError(f"{name}: a mask must be a 3-D scalar volume, got {image.GetDimension()}-D")
    # voxel index of the mask -> voxel index of the series: a signed axis permutation plus a whole shift
    m = np.linalg.inv(grid.matrix) @ _sitk_matrix(image)
    rot = np.round(m[:3, :3])
    shift = np.round(m[:3, 3])
    perm_ok = np.allclose(np.abs(rot).sum(axis=0), 1) and np.allclose(np.abs(rot).sum(axis=1), 1)
    size = np.asarray(image.GetSize())
    mapped_size = np.abs(rot) @ size
    if not (
        perm_ok
        and np.abs(m[:3, :3] - rot).max() < 1e-3
        and np.abs(m[:3, 3] - shift).max() < 1e-2
        and np.array_equal(mapped_size, np.asarray(grid.shape))
    ):
        raise DicomError(
            f"{name} is not on the series' voxel grid: the mask has size {tuple(int(s) for s in size)}, spacing "
            f"{tuple(round(s, 4) for s in image.GetSpacing())}, origin {tuple(round(o, 3) for o in image.GetOrigin())}; "
            f"the series has size {grid.shape}, spacing {tuple(round(s, 4) for s in grid.spacing)}, origin "
            f"{tuple(round(o, 3) for o in grid.origin)} (LPS mm). Resample the mask onto the series first"
        )
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0  # (i, j, k) of the mask
    out = np.zeros(grid.shape, dtype=bool)  # (column, row, slice) of the series
    idx = np.indices(array.shape).reshape(3, -1)
    target = (rot @ idx + shift[:, None]).astype(np.int64)
    if (target.min(axis=1) < 0).any() or (target.max(axis=1) >= np.asarray(grid.shape)).any():
        raise DicomError(f"{name} is shifted against the series' voxel grid (origin {image.GetOrigin()})")
    out[tuple(target)] = array.reshape(-1)
    return out.transpose(2, 1, 0)


def save_dicom(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Save ``ds`` as a DICOM Part 10 file, atomically (a reader sees no file or the whole one)."""
    from dgst_monai.files import atomic_open

    target = Path(path)
    with atomic_open(target, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)
    return target


@dataclass
class DicomOutput:
    """What :func:`mask_to_dicom` wrote, and what a user should know about it."""

    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return [labels == i for i in range(1, n + 1)]


def mask_to_dicom(
    mask: str | os.PathLike[str] | sitk.Image,
    series: str | os.PathLike[str] | CTSeries,
    output: str | os.PathLike[str],
    formats: str | Sequence[str] = DICOM_FORMATS,
    *,
    roi_name: str = "Lymph nodes",
    split_nodes: bool = False,
    stem: str | None = None,
) -> DicomOutput:
    """Write a lymph-node mask on a CT series as DICOM-SEG and / or RTSTRUCT files into ``output``.

    Args:
        mask: a volume file (NIfTI, NRRD, MetaImage) or SimpleITK image on the series' voxel grid; voxels > 0
            are lymph node.
        series: the CT series folder (or a scanned :class:`~dgst_monai.dicom.series.CTSeries`).
        output: folder for ``<stem>_seg.dcm`` and ``<stem>_rtstruct.dcm``.
        formats: ``dicom-seg`` and / or ``rtstruct``.
        roi_name: RTSTRUCT ROI name (with ``split_nodes``, the ROIs are ``"<roi_name> 1"``, ``"... 2"``, ...).
        split_nodes: one RTSTRUCT ROI per connected node (26-connectivity) instead of one ROI.
        stem: file name stem (default: the mask file's case id, or the series folder's name).

    Returns:
        The files written by format, and notes (empty mask, UIDs the source lacked).

    Raises:
        DicomError: an unknown format, a folder without exactly one regular CT series, or a mask off its grid.
    """
    import dgst_monai
    from dgst_monai.data.cases import case_id_from_path
    from dgst_monai.data.readers import read_image
    from dgst_monai.dicom.rtstruct import structure_set
    from dgst_monai.dicom.seg import segmentation

    wanted = parse_formats(formats, DICOM_FORMATS)
    ct = series if isinstance(series, CTSeries) else load_series(series)
    if isinstance(mask, sitk.Image):
        name, image = "the mask", mask
    else:
        name, image = str(mask), read_image(mask)
    voxels = mask_on_grid(image, ct.grid, name)
    stem = stem or (case_id_from_path(mask) if not isinstance(mask, sitk.Image) else ct.folder.name)
    out_dir = Path(output).expanduser()
    software = ("dgst-monai", dgst_monai.__version__)
    number = int(ct.first.get("SeriesNumber", 0) or 0)
    result = DicomOutput()
    if not voxels.any():
        result.notes.append(f"{name}: the mask is empty; the SEG segment / RTSTRUCT ROI is written without voxels")
    for keyword, value in ct.derived_uids.items():
        result.notes.append(
            f"the source series has no {keyword}; the objects reference the derived UID {value}, which a PACS "
            "holding the source cannot resolve"
        )
    if "dicom-seg" in wanted:
        ds = segmentation(voxels, ct, series_number=number + SEG_SERIES_OFFSET, software=software)
        result.files["dicom-seg"] = save_dicom(ds, out_dir / f"{stem}_seg.dcm")
    if "rtstruct" in wanted:
        rois = (
            [(f"{roi_name} {i}", node) for i, node in enumerate(_components(voxels), start=1)]
            if split_nodes
            else [(roi_name, voxels)]
        )
        if not rois:  # split_nodes on an empty mask: still one (empty) ROI
            rois = [(roi_name, voxels)]
        ds = structure_set(ct, rois, series_number=number + RTSTRUCT_SERIES_OFFSET, software=software)
        result.files["rtstruct"] = save_dicom(ds, out_dir / f"{stem}_rtstruct.dcm")
    return result
