"""SimpleITK-based image reading for MONAI: NIfTI, NRRD, MetaImage and DICOM series folders with RAS affines.

MONAI's ``ITKReader`` needs the ``itk`` package and its ``NrrdReader`` needs ``pynrrd``; neither is a dependency
of dgst-monai, SimpleITK is. :class:`SimpleITKReader` is a MONAI :class:`~monai.data.ImageReader` over
SimpleITK, so a bundle's ``LoadImaged`` reads every format the product supports with one reader::

    {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": true,
     "reader": "dgst_monai.data.readers.SimpleITKReader"}

SimpleITK (like ITK and DICOM) describes geometry in LPS world coordinates with (x, y, z) index order and
returns arrays in (z, y, x) order; the reader transposes arrays to (x, y, z) and converts the affine to RAS
(negating the first two world rows), which is what nibabel and ``Orientationd(axcodes="RAS")`` expect.

The module also holds the header and series helpers shared by ``dgst-monai data index`` and ``data check``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from dgst_monai.data.cases import has_volume_suffix

__all__ = [
    "Geometry",
    "SimpleITKReader",
    "dicom_series_files",
    "is_supported_path",
    "lps_to_ras_affine",
    "read_header",
    "read_image",
]

def is_supported_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder (DICOM series) or a volume file (:data:`dgst_monai.data.cases.VOLUME_SUFFIXES`)."""
    return Path(path).is_dir() or has_volume_suffix(path)


def dicom_series_files(folder: str | os.PathLike[str], series_uid: str | None = None) -> list[str]:
    """The files of one DICOM series in ``folder`` (not its sub-folders), sorted by GDCM along the slice normal.

    Args:
        folder: a folder holding DICOM files.
        series_uid: SeriesInstanceUID to read; by default the series with the most files (a folder exported
            per series holds one; RT structure sets and other single-file objects then lose to the CT).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
        ValueError: no DICOM image series in ``folder``, or ``series_uid`` is not among them.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DICOM series folder {folder} does not exist")
    uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
    if not uids:
        raise ValueError(f"{folder}: no DICOM image series found in this folder (sub-folders are not searched)")
    if series_uid is not None:
        if series_uid not in uids:
            raise ValueError(f"{folder}: no DICOM series {series_uid}; found {', '.join(uids)}")
        uids = [series_uid]
    by_size = [(len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)), uid) for uid in uids]
    _, best = max(by_size, key=lambda t: (t[0], t[1]))
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, best))


def read_image(path: str | os.PathLike[str], series_uid: str | None = None) -> sitk.Image:
    """Read an image file, or a DICOM series folder, with SimpleITK (DICOM rescale slope/intercept applied).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: SimpleITK cannot read it (the message names the file and SimpleITK's reason).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_series_files(p, series_uid))
            return reader.Execute()
        return sitk.ReadImage(str(p))
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(f"cannot read {p}: {_short(err)}") from None


@dataclass(frozen=True)
class Geometry:
    """Header information of an image: what ``data check`` compares before reading any voxel.

    Attributes:
        size: voxels per axis, (x, y, z) order.
        spacing: mm per axis.
        origin: world position of voxel (0, 0, 0), LPS mm.
        direction: row-major direction cosine matrix (dimension x dimension), LPS.
        components: values per voxel (1 for a scalar image).
        pixel_type: SimpleITK pixel type name, e.g. '16-bit signed integer'.
        slice_positions: DICOM only: position of each slice along the slice normal (mm), sorted.
        files: DICOM only: number of files in the series.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1
    pixel_type: str = ""
    slice_positions: tuple[float, ...] = field(default=(), repr=False)
    files: int = 1

    @property
    def dimension(self) -> int:
        """Number of axes."""
        return len(self.size)


def read_header(path: str | os.PathLike[str], series_uid: str | None = None) -> Geometry:
    """Read only the header (no voxel data) of an image file, or the headers of a DICOM series.

    For a DICOM folder the slice spacing is the median distance between consecutive slice positions along the
    slice normal, and :attr:`Geometry.slice_positions` lets callers spot gaps.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: unreadable header (the message names the file and the reason).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        if p.is_dir():
            return _dicom_header(p, series_uid)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        return Geometry(
            size=tuple(int(s) for s in reader.GetSize()),
            spacing=tuple(float(s) for s in reader.GetSpacing()),
            origin=tuple(float(s) for s in reader.GetOrigin()),
            direction=tuple(float(s) for s in reader.GetDirection()),
            components=int(reader.GetNumberOfComponents()),
            pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        )
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(f"cannot read the header of {p}: {_short(err)}") from None


def _dicom_header(folder: Path, series_uid: str | None) -> Geometry:
    files = dicom_series_files(folder, series_uid)
    reader = sitk.ImageFileReader()
    positions: list[np.ndarray] = []
    first: dict[str, Any] = {}
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        if not first:
            first = {
                "size": reader.GetSize(),
                "spacing": reader.GetSpacing(),
                "direction": np.array(reader.GetDirection(), dtype=float).reshape(3, 3),
                "components": reader.GetNumberOfComponents(),
                "pixel": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
            }
        positions.append(np.array(reader.GetOrigin(), dtype=float))
    direction = first["direction"].copy()
    normal = np.cross(direction[:, 0], direction[:, 1])
    along = np.sort(np.array([pos @ normal for pos in positions]))
    gaps = np.diff(along)
    dz = float(np.median(gaps)) if gaps.size else float(first["spacing"][2])
    direction[:, 2] = normal  # GDCM orders slices along the normal of the row/column cosines
    return Geometry(
        size=(int(first["size"][0]), int(first["size"][1]), len(files)),
        spacing=(float(first["spacing"][0]), float(first["spacing"][1]), dz),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(float(v) for v in direction.ravel()),
        components=int(first["components"]),
        pixel_type=str(first["pixel"]),
        slice_positions=tuple(float(v) for v in along),
        files=len(files),
    )


def lps_to_ras_affine(
    spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]
) -> np.ndarray:
    """The (d+1) x (d+1) voxel-to-RAS affine of an ITK / SimpleITK geometry given in LPS.

    ITK maps index i to ``origin + direction @ diag(spacing) @ i`` in LPS; RAS negates the first two world
    axes.
    """
    d = len(spacing)
    rot = np.asarray(direction, dtype=np.float64).reshape(d, d)
    affine = np.eye(d + 1)
    affine[:d, :d] = rot @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:d, d] = np.asarray(origin, dtype=np.float64)
    flip = np.ones(d + 1)
    flip[: min(d, 2)] = -1.0
    return np.diag(flip) @ affine


def _short(err: BaseException) -> str:
    """The last informative line of a (long, multi-line) ITK exception message."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    informative = [ln for ln in lines if not ln.startswith(("Exception thrown", "/"))]
    return (informative or lines or [type(err).__name__])[-1][:300]


class SimpleITKReader(ImageReader):
    """MONAI image reader over SimpleITK: NIfTI, NRRD, MetaImage files and DICOM series folders.

    Arrays come out in (x, y, z) order (channels last for vector images) with a RAS affine, like MONAI's
    ``ITKReader`` with its defaults, so the rest of the MONAI transform chain (``EnsureChannelFirstd``,
    ``Orientationd``, ``Spacingd``) behaves the same whichever file format the data came in.

    Args:
        series_uid: DICOM folders: the SeriesInstanceUID to read (default: the series with most files).
        affine_lps_to_ras: convert ITK's LPS affine to RAS (MONAI's convention). Keep True.

    Example:
        >>> from monai.transforms import LoadImaged
        >>> load = LoadImaged(["image", "label"], reader="dgst_monai.data.readers.SimpleITKReader")
        >>> # load({"image": "ct.nrrd", "label": "ln.nrrd"}) or {"image": "dicom_series_folder/", ...}
    """

    def __init__(self, series_uid: str | None = None, affine_lps_to_ras: bool = True, **kwargs: Any) -> None:
        super().__init__()
        self.series_uid = series_uid
        self.affine_lps_to_ras = affine_lps_to_ras
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> bool:
        """True if every name is a DICOM folder or a volume file (:data:`dgst_monai.data.cases.VOLUME_SUFFIXES`)."""
        return all(is_supported_path(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], **kwargs: Any) -> Any:
        """Read one image (a ``SimpleITK.Image``) or a list of them for a sequence of names."""
        images = [read_image(f, kwargs.get("series_uid", self.series_uid)) for f in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The voxel array (x, y, z[, c]) and MONAI metadata; a list of images is stacked on a new axis 0.

        Raises:
            ValueError: images of a list differ in shape or affine (they cannot be stacked as channels).
        """
        images = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays: list[np.ndarray] = []
        meta: dict[str, Any] = {}
        for i, image in enumerate(images):
            array, header = self._one(image)
            if i == 0:
                meta = header
            elif array.shape != arrays[0].shape or not np.allclose(header[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]):
                raise ValueError(
                    f"cannot stack images as channels: image {i} has shape {array.shape} and affine "
                    f"{header[MetaKeys.AFFINE].tolist()}, image 0 has {arrays[0].shape} and "
                    f"{meta[MetaKeys.AFFINE].tolist()}"
                )
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta

    def _one(self, image: sitk.Image) -> tuple[np.ndarray, dict[str, Any]]:
        array = sitk.GetArrayFromImage(image)  # (z, y, x) or (z, y, x, c)
        d = image.GetDimension()
        vector = image.GetNumberOfComponentsPerPixel() > 1
        spatial_axes = tuple(range(d - 1, -1, -1))
        array = np.transpose(array, spatial_axes + ((d,) if vector else ()))
        # Only geometry: raw header entries differ between files and formats and would break batch collation.
        meta: dict[str, Any] = {}
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
        if self.affine_lps_to_ras:
            affine = lps_to_ras_affine(spacing, origin, direction)
        else:
            affine = np.eye(d + 1)
            affine[:d, :d] = np.asarray(direction).reshape(d, d) @ np.diag(spacing)
            affine[:d, d] = origin
        meta["spacing"] = np.asarray(spacing, dtype=np.float64)
        meta[MetaKeys.ORIGINAL_AFFINE] = affine
        meta[MetaKeys.AFFINE] = affine.copy()
        meta[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize())
        meta[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1 if vector else float("nan")
        return np.ascontiguousarray(array), meta
