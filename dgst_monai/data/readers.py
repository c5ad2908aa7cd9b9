"""SimpleITK-based image reading for MONAI: NIfTI, NRRD, MetaImage and DICOM series folders with RAS affines.

MONAI's ``ITKReader`` needs the ``itk`` package and its ``NrrdReader`` needs ``pynrrd``; neither is a dependency
of dgst-monai, SimpleITK is. :class:`SimpleITKReader` is a MONAI :class:`~monai.data.ImageReader` over
SimpleITK, so a bundle's ``LoadImaged`` reads every format the product supports with one reader::

    {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": true,
     "reader": "dgst_monai.data.readers.SimpleITKReader"}

SimpleITK (like ITK and DICOM) describes geometry in LPS world coordinates with (x, y, z) index order and
returns arrays in (z, y, x) order; the reader transposes arrays to (x, y, z) and converts the affine to RAS
(negating the first two world rows), which is what nibabel and ``Orientationd(axcodes="RAS")`` expect.

Damaged input is an error naming the file, never a zero-filled volume: ITK reads a truncated NIfTI without
complaint (filling the missing voxels with zeros) and decodes a corrupt gzip stream without checking it, so every
file is checked first (:func:`dgst_monai.data.integrity.check_image_file`); a DICOM series folder with a file
that is a DICOM file but that GDCM cannot parse (truncated), or with irregular slice positions (missing
slices), is refused too. Every reading failure is a :class:`dgst_monai.files.DamagedFileError` (a
``RuntimeError``), raised when MONAI's ``LoadImage`` asks for the voxels (:meth:`SimpleITKReader.get_data`), so
that it is not caught by ``LoadImage``'s fallback to other readers that would read the damaged file.

The module also holds the header and series helpers shared by ``dgst-monai data index`` and ``data check``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from dgst_monai.data.cases import NIFTI_SUFFIXES, has_volume_suffix
from dgst_monai.data.integrity import check_image_file, check_nifti_header
from dgst_monai.files import DamagedFileError

__all__ = [
    "SLICE_GAP_TOLERANCE",
    "DamagedFileError",
    "Geometry",
    "SimpleITKReader",
    "dicom_series_files",
    "is_supported_path",
    "lps_to_ras_affine",
    "read_header",
    "read_image",
]

#: Relative spread of the gaps between DICOM slice positions beyond which a series has missing or extra slices.
SLICE_GAP_TOLERANCE = 1e-2

#: A DICOM Part 10 file has this marker after its 128-byte preamble.
_DICOM_MAGIC = (128, b"DICM")


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
        DamagedFileError: a file of the folder is a DICOM file of the series' kind (SOP class) that GDCM
            cannot parse, e.g. a truncated slice: GDCM would silently leave it out of its series.
    """
    folder = str(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DICOM series folder {folder} does not exist")
    uids = sorted(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
    if not uids:
        raise ValueError(f"{folder}: no DICOM image series found in this folder (sub-folders are not searched)")
    series = {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)) for uid in uids}
    _check_dicom_members(folder, series)
    if series_uid is not None:
        if series_uid not in uids:
            raise ValueError(f"{folder}: no DICOM series {series_uid}; found {', '.join(uids)}")
        uids = [series_uid]
    _, best = max(((len(series[uid]), uid) for uid in uids), key=lambda t: (t[0], t[1]))
    return series[best]


def _sop_class_of_file(path: str) -> str | None:
    """The Media Storage SOP Class UID (0002,0002) of a DICOM Part 10 file's meta header; None if it has no
    ``DICM`` marker; ``""`` if the marker is there but the meta header is cut short or garbled."""
    with open(path, "rb") as fh:
        fh.seek(_DICOM_MAGIC[0])
        if fh.read(len(_DICOM_MAGIC[1])) != _DICOM_MAGIC[1]:
            return None
        # the file meta group is always explicit VR little endian: tag, VR, then a 2- or (OB, UN, ...) 4-byte length
        while len(head := fh.read(6)) == 6:
            group, element = struct.unpack("<HH", head[:4])
            if group != 0x0002:
                break
            if head[4:6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                fh.read(2)
                (length,) = struct.unpack("<I", fh.read(4).ljust(4, b"\0"))
            else:
                (length,) = struct.unpack("<H", fh.read(2).ljust(2, b"\0"))
            value = fh.read(length)
            if element == 0x0002:
                return value.decode("ascii", "replace").strip("\0 ")
    return ""


def _check_dicom_members(folder: str, series: dict[str, list[str]]) -> None:
    """Refuse a folder with DICOM files of its image series' kind that GDCM left out of every series (it skips
    files it cannot parse, e.g. truncated slices); other DICOM objects (DICOMDIR, ...) do not count."""
    listed = {os.path.realpath(f) for files in series.values() for f in files}
    reader = sitk.ImageFileReader()
    kinds = set()
    for files in series.values():
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        kinds.add(reader.GetMetaData("0008|0016").strip("\0 ") if reader.HasMetaDataKey("0008|0016") else "")
    damaged = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and os.path.realpath(entry.path) not in listed:
            kind = _sop_class_of_file(entry.path)
            if kind is not None and (kind == "" or kind in kinds):
                damaged.append(entry.name)
    if damaged:
        raise DamagedFileError(
            f"{folder}: DICOM file(s) {', '.join(damaged)} cannot be parsed (truncated or corrupt); the series "
            "would be read without them. Copy the series again"
        )


def read_image(path: str | os.PathLike[str], series_uid: str | None = None) -> sitk.Image:
    """Read an image file, or a DICOM series folder, with SimpleITK (DICOM rescale slope/intercept applied).

    The file is checked first (:func:`~dgst_monai.data.integrity.check_image_file`); a DICOM series must have
    regular slice positions.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DamagedFileError: truncated, corrupt or unreadable (a ``RuntimeError``; the message names the file and
            the reason), or a geometry that is not finite.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        if p.is_dir():
            files = dicom_series_files(p, series_uid)
            _check_slice_positions(p, _dicom_header(p, series_uid, files))
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            check_image_file(p)
            image = sitk.ReadImage(str(p))
    except DamagedFileError:
        raise
    except (RuntimeError, ValueError, OSError) as err:
        raise DamagedFileError(f"cannot read {p}: {_short(err)}") from None
    geometry = (*image.GetSpacing(), *image.GetOrigin(), *image.GetDirection())
    if not all(np.isfinite(geometry)):
        raise DamagedFileError(
            f"{p}: damaged header: spacing {image.GetSpacing()}, origin {image.GetOrigin()}, direction "
            f"{image.GetDirection()} are not all finite"
        )
    return image


def _check_slice_positions(folder: Path, geometry: Geometry) -> None:
    gaps = np.diff(np.asarray(geometry.slice_positions))
    if gaps.size < 2:
        return
    median = float(np.median(gaps))
    if gaps.min() <= 1e-6 or (gaps.max() - gaps.min()) > SLICE_GAP_TOLERANCE * median:
        raise DamagedFileError(
            f"{folder}: the DICOM series has missing or duplicate slices (gaps between slice positions from "
            f"{gaps.min():.3g} to {gaps.max():.3g} mm); run dgst-monai data check on it"
        )


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
        DamagedFileError: unreadable header, or a damaged file in a DICOM folder (a ``RuntimeError``; the
            message names the file and the reason).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        if p.is_dir():
            return _dicom_header(p, series_uid)
        if p.name.lower().endswith(NIFTI_SUFFIXES):
            check_nifti_header(p)  # ITK hangs on some damaged NIfTI headers: it must not see them
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
    except DamagedFileError:
        raise
    except (RuntimeError, ValueError, OSError) as err:
        check_image_file(p)  # a damaged file's own reason says more than ITK's "unable to determine ImageIO reader"
        raise DamagedFileError(f"cannot read the header of {p}: {_short(err)}") from None


def _dicom_header(folder: Path, series_uid: str | None, files: list[str] | None = None) -> Geometry:
    files = dicom_series_files(folder, series_uid) if files is None else files
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


@dataclass(frozen=True)
class _Pending:
    """Image(s) :meth:`SimpleITKReader.read` was asked for, read by :meth:`SimpleITKReader.get_data`."""

    paths: tuple[str | os.PathLike[str], ...]
    series_uid: str | None


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

    def read(self, data: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], **kwargs: Any) -> _Pending:
        """Note the image(s) to read; :meth:`get_data` reads them (so that reading errors reach the caller
        instead of ``LoadImage``'s fallback to other readers, which would read a damaged file)."""
        return _Pending(tuple(ensure_tuple(data)), kwargs.get("series_uid", self.series_uid))

    def get_data(self, img: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The voxel array (x, y, z[, c]) and MONAI metadata; a list of images is stacked on a new axis 0.

        Args:
            img: what :meth:`read` returned, or a ``SimpleITK.Image`` or a list of them.

        Raises:
            FileNotFoundError: a file does not exist.
            DamagedFileError: a file is truncated, corrupt or unreadable (see :func:`read_image`).
            ValueError: images of a list differ in shape or affine (they cannot be stacked as channels).
        """
        if isinstance(img, _Pending):
            img = [read_image(f, img.series_uid) for f in img.paths]
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
