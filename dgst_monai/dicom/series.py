"""Find the DICOM objects under a folder: CT series, RT structure sets and segmentations, with their geometry.

Real exports are messy: any depth, any file names (with or without ``.dcm``), several series in one folder, and
anonymised files whose SOP Instance, Series and Study UIDs are empty in the data set (the file meta still holds
the instance and class UIDs). :func:`scan` reads every file's header once (pydicom, no pixel data) and groups
CT slices by SeriesInstanceUID, or, where that is empty, by folder, frame of reference and image plane.
A series without a SeriesInstanceUID gets a *derived* UID, a deterministic hash of its instances
(:func:`pydicom.uid.generate_uid` with the sorted SOP Instance UIDs as entropy), so that what we write for it
and what we read back pair up; :attr:`CTSeries.derived_uids` says which of its UIDs were derived.

Geometry follows DICOM: voxel (i, j, k) (column, row, slice) of a series sits at
``origin + i * dx * row_cosine + j * dy * column_cosine + k * dz * normal`` in LPS millimetres, slices sorted
along the normal of the row and column cosines (as GDCM and SimpleITK sort them).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "RTSTRUCT_STORAGE",
    "SEG_STORAGE",
    "LABELMAP_SEG_STORAGE",
    "CTSeries",
    "DicomError",
    "DicomFolder",
    "Grid",
    "LabelObject",
    "derived_uid",
    "read_header",
    "scan",
    "uid_of",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: relative spread of the gaps between slice positions beyond which a series is not uniformly spaced
SPACING_TOLERANCE = 1e-2
#: slice positions off the slice normal by more than this (mm per mm along it) make a series gantry-tilted
TILT_TOLERANCE = 1e-3


class DicomError(ValueError):
    """DICOM input that cannot be used as asked (no CT series, a mask off the series' grid, no matching
    structure, ...); the message names the file or folder and the problem."""


def uid_of(ds: Dataset, keyword: str) -> str:
    """A UID attribute of ``ds`` with trailing padding removed; the file meta's copy for SOP Instance / Class UIDs
    that an anonymiser emptied in the data set; ``""`` when neither has it."""
    value = str(ds.get(keyword, "") or "").strip("\0 ")
    if value or keyword not in ("SOPInstanceUID", "SOPClassUID"):
        return value
    meta = getattr(ds, "file_meta", None)
    meta_key = {"SOPInstanceUID": "MediaStorageSOPInstanceUID", "SOPClassUID": "MediaStorageSOPClassUID"}[keyword]
    return str(meta.get(meta_key, "") or "").strip("\0 ") if meta is not None else ""


@dataclass(frozen=True)
class Grid:
    """A CT series' voxel grid in LPS millimetres.

    Attributes:
        shape: (columns, rows, slices).
        spacing: (column spacing dx, row spacing dy, slice distance dz), mm.
        origin: the centre of voxel (0, 0, 0).
        direction: 3 x 3, columns: row cosine, column cosine, slice normal.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    @property
    def matrix(self) -> np.ndarray:
        """4 x 4 map from voxel (i, j, k) to LPS (x, y, z)."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction, dtype=np.float64) @ np.diag(self.spacing)
        out[:3, 3] = self.origin
        return out

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """LPS points (n, 3) to continuous voxel indices (n, 3)."""
        inverse = np.linalg.inv(self.matrix)
        return np.asarray(points, dtype=np.float64) @ inverse[:3, :3].T + inverse[:3, 3]

    def to_world(self, indices: np.ndarray) -> np.ndarray:
        """Voxel indices (n, 3) to LPS points (n, 3)."""
        m = self.matrix
        return np.asarray(indices, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def sitk_geometry(self) -> dict[str, Any]:
        """Spacing, origin and (row-major) direction as SimpleITK takes them."""
        return {
            "spacing": tuple(float(s) for s in self.spacing),
            "origin": tuple(float(o) for o in self.origin),
            "direction": tuple(float(v) for v in np.asarray(self.direction).ravel()),
        }


@dataclass
class CTSeries:
    """One CT series: its headers sorted along the slice normal, its UIDs and its grid.

    Attributes:
        uid: the SeriesInstanceUID, or a derived one (see :attr:`derived_uids`).
        files: slice files, sorted along the slice normal.
        headers: their data sets (no pixel data), same order.
        problems: reasons the series cannot be used as one regular volume (tilted, irregular spacing, ...).
        derived_uids: the UID attributes (``SeriesInstanceUID``, ``StudyInstanceUID``, ``FrameOfReferenceUID``)
            that the files lack and that were derived.
    """

    uid: str
    files: list[Path]
    headers: list[Dataset]
    problems: list[str] = field(default_factory=list)
    derived_uids: dict[str, str] = field(default_factory=dict)
    _grid: Grid | None = field(default=None, repr=False)

    @property
    def first(self) -> Dataset:
        return self.headers[0]

    @property
    def folder(self) -> Path:
        """The folder of the slices (the first slice's when they are spread over several)."""
        return self.files[0].parent

    @property
    def folders(self) -> set[Path]:
        return {f.parent for f in self.files}

    def attribute_uid(self, keyword: str) -> str:
        """``SeriesInstanceUID``, ``StudyInstanceUID`` or ``FrameOfReferenceUID``, real or derived."""
        return uid_of(self.first, keyword) or self.derived_uids.get(keyword, "")

    @property
    def study_uid(self) -> str:
        return self.attribute_uid("StudyInstanceUID")

    @property
    def frame_of_reference_uid(self) -> str:
        return self.attribute_uid("FrameOfReferenceUID")

    @property
    def sop_instance_uids(self) -> list[str]:
        return [uid_of(h, "SOPInstanceUID") for h in self.headers]

    def headers_with_uids(self) -> list[Dataset]:
        """Copies of the headers with every UID filled in: SOP Instance / Class UIDs from the file meta, the
        derived Series / Study / Frame of Reference UIDs where the files lack them (for writers that need them)."""
        out = []
        for header in self.headers:
            copy = Dataset(header)
            copy.file_meta = header.file_meta
            copy.SOPInstanceUID, copy.SOPClassUID = uid_of(header, "SOPInstanceUID"), uid_of(header, "SOPClassUID")
            for keyword, value in self.derived_uids.items():
                setattr(copy, keyword, value)
            out.append(copy)
        return out

    @property
    def grid(self) -> Grid:
        if self._grid is None:
            raise ValueError(f"series {self.uid} in {self.folder} has no regular grid: {'; '.join(self.problems)}")
        return self._grid

    @property
    def description(self) -> str:
        folders = sorted(str(f) for f in self.folders)
        where = folders[0] if len(folders) == 1 else f"{len(folders)} folders ({folders[0]}, ...)"
        return f"CT series {self.uid} ({len(self.files)} slices in {where})"


@dataclass
class LabelObject:
    """An RT Structure Set or a Segmentation: where it is, its full data set, the series it references."""

    path: Path
    dataset: Dataset
    kind: str  # "RTSTRUCT" or "SEG"

    @property
    def series_uids(self) -> set[str]:
        """SeriesInstanceUIDs it references (empty ones left out)."""
        ds = self.dataset
        found = set()
        if self.kind == "RTSTRUCT":
            for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
                for study in ref.get("RTReferencedStudySequence", []):
                    for series in study.get("RTReferencedSeriesSequence", []):
                        found.add(uid_of(series, "SeriesInstanceUID"))
        else:
            for series in ds.get("ReferencedSeriesSequence", []):
                found.add(uid_of(series, "SeriesInstanceUID"))
        return found - {""}

    @property
    def instance_uids(self) -> set[str]:
        """SOP Instance UIDs of the images it references (contour images, source images)."""
        ds = self.dataset
        found: set[str] = set()
        if self.kind == "RTSTRUCT":
            for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
                for study in ref.get("RTReferencedStudySequence", []):
                    for series in study.get("RTReferencedSeriesSequence", []):
                        found.update(_ref_uids(series.get("ContourImageSequence", [])))
            for roi in ds.get("ROIContourSequence", []):
                for contour in roi.get("ContourSequence", []):
                    found.update(_ref_uids(contour.get("ContourImageSequence", [])))
        else:
            for series in ds.get("ReferencedSeriesSequence", []):
                found.update(_ref_uids(series.get("ReferencedInstanceSequence", [])))
            for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
                for derivation in frame.get("DerivationImageSequence", []):
                    found.update(_ref_uids(derivation.get("SourceImageSequence", [])))
        return found - {""}

    @property
    def frame_of_reference_uids(self) -> set[str]:
        ds = self.dataset
        found = {uid_of(ds, "FrameOfReferenceUID")}
        for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
            found.add(uid_of(ref, "FrameOfReferenceUID"))
        for roi in ds.get("StructureSetROISequence", []):
            found.add(uid_of(roi, "ReferencedFrameOfReferenceUID"))
        return found - {""}


def _ref_uids(items: Iterable[Dataset]) -> set[str]:
    return {str(item.get("ReferencedSOPInstanceUID", "") or "").strip("\0 ") for item in items}


@dataclass
class DicomFolder:
    """What :func:`scan` found under a folder.

    Attributes:
        series: CT series by (real or derived) SeriesInstanceUID.
        labels: RT structure sets and segmentations.
        unreadable: DICOM files that could not be parsed, with the reason.
        other: number of DICOM files of other kinds (MR, RT plans, DICOMDIR, ...), by modality.
        not_dicom: number of files that are not DICOM.
    """

    series: dict[str, CTSeries] = field(default_factory=dict)
    labels: list[LabelObject] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)
    not_dicom: int = 0


def _kind(ds: Dataset) -> str:
    sop_class = uid_of(ds, "SOPClassUID")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class == RTSTRUCT_STORAGE or modality == "RTSTRUCT":
        return "RTSTRUCT"
    if sop_class in (SEG_STORAGE, LABELMAP_SEG_STORAGE) or modality == "SEG":
        return "SEG"
    if modality == "CT" and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        return "CT"
    return modality or "unknown"


def _is_part10(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | os.PathLike[str]) -> Dataset:
    """A DICOM file's data set without pixel data.

    Raises:
        InvalidDicomError: not a DICOM file.
        ValueError: a DICOM file that cannot be parsed (truncated, corrupt), naming it.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise
    except Exception as err:  # pydicom raises many kinds on damaged files
        raise ValueError(f"{path}: damaged DICOM file ({type(err).__name__}: {err})") from None


def scan(folder: str | os.PathLike[str]) -> DicomFolder:
    """Read the header of every file under ``folder`` (any depth) and group CT slices into series.

    Structure sets and segmentations are read whole (they are small and their content is in the header).

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist or is not a folder")
    found = DicomFolder()
    slices: dict[tuple[Any, ...], list[tuple[Path, Dataset]]] = defaultdict(list)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.upper() == "DICOMDIR":
                continue
            try:
                ds = read_header(path)
            except InvalidDicomError:
                if _is_part10(path):
                    found.unreadable.append((path, "has the DICM marker but cannot be parsed"))
                else:
                    found.not_dicom += 1
                continue
            except ValueError as err:
                found.unreadable.append((path, str(err).split(": ", 1)[-1]))
                continue
            kind = _kind(ds)
            if kind == "unknown" and "SOPClassUID" not in ds and "Modality" not in ds:
                found.unreadable.append((path, "a DICOM file cut short (no SOP class, no modality)"))
                continue
            if kind == "CT":
                damage = _pixel_damage(path, ds)
                if damage:
                    found.unreadable.append((path, damage))
                    continue
            if kind in ("RTSTRUCT", "SEG"):
                try:
                    full = pydicom.dcmread(path)
                except Exception as err:  # noqa: BLE001 - any parse failure is a damaged file
                    found.unreadable.append((path, f"damaged {kind} ({type(err).__name__}: {err})"))
                    continue
                found.labels.append(LabelObject(path, full, kind))
            elif kind == "CT":
                slices[_series_key(path, ds)].append((path, ds))
            else:
                found.other[kind] = found.other.get(kind, 0) + 1
    for key, members in slices.items():
        series = _make_series(key, members)
        twin = found.series.get(series.uid)
        if twin is not None:  # a copy of an anonymised series elsewhere: same instances, so the same derived UID
            for one, other in ((twin, series), (series, twin)):
                one.problems.append(f"the same instances are also in {other.folder} (a copy of this series)")
            series.uid = derived_uid("SeriesInstanceUID", [str(series.folder), *series.sop_instance_uids])
        found.series[series.uid] = series
    return found


def _pixel_damage(path: Path, header: Dataset) -> str:
    """Why a CT slice's pixel data is unusable (cut short, missing), or ``""``. pydicom reads a truncated file
    without complaint, so the length is checked here (a file too small for its image is refused without reading
    it again)."""
    expected = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1)) * int(
        header.BitsAllocated
    ) // 8
    if not header.file_meta.TransferSyntaxUID.is_compressed:
        if path.stat().st_size < expected:
            return f"pixel data cut short (the file has {path.stat().st_size} bytes, its image needs {expected})"
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - any parse failure is damage
        return f"damaged ({type(err).__name__}: {err})"
    if "PixelData" not in ds:
        return "no pixel data (the file is cut short)"
    if not header.file_meta.TransferSyntaxUID.is_compressed and len(ds.PixelData) < expected:
        return f"pixel data cut short ({len(ds.PixelData)} of {expected} bytes)"
    return ""


def _series_key(path: Path, ds: Dataset) -> tuple[Any, ...]:
    uid = uid_of(ds, "SeriesInstanceUID")
    if uid:
        return ("uid", uid)
    # no SeriesInstanceUID: slices of one folder, frame of reference and image plane belong together
    orientation = tuple(round(float(v), 4) for v in ds.get("ImageOrientationPatient", []))
    return (
        "derived", str(path.parent), uid_of(ds, "FrameOfReferenceUID"), uid_of(ds, "StudyInstanceUID"),
        orientation, int(ds.get("Rows", 0)), int(ds.get("Columns", 0)),
        str(ds.get("SeriesNumber", "") or ""),
    )


def derived_uid(kind: str, members: Sequence[str]) -> str:
    """A UID derived deterministically from ``members`` (e.g. the SOP Instance UIDs of a series)."""
    return generate_uid(entropy_srcs=[kind, *sorted(members)])


def _make_series(key: tuple[Any, ...], members: list[tuple[Path, Dataset]]) -> CTSeries:
    headers = [ds for _, ds in members]
    first = headers[0]
    row = np.asarray(first.ImageOrientationPatient[:3], dtype=np.float64)
    col = np.asarray(first.ImageOrientationPatient[3:], dtype=np.float64)
    normal = np.cross(row, col)
    order = np.argsort([float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)) for ds in headers])
    files = [members[i][0] for i in order]
    headers = [headers[i] for i in order]
    instance_uids = [uid_of(h, "SOPInstanceUID") or str(f) for f, h in zip(files, headers)]
    derived: dict[str, str] = {}
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if not uid_of(first, keyword):
            derived[keyword] = derived_uid(keyword, instance_uids)
    uid = key[1] if key[0] == "uid" else derived["SeriesInstanceUID"]
    series = CTSeries(uid=uid, files=files, headers=headers, derived_uids=derived)
    series.problems = _geometry_problems(headers)
    if not series.problems:
        series._grid = _grid(headers)
    return series


def _geometry_problems(headers: Sequence[Dataset]) -> list[str]:
    problems = []
    first = headers[0]
    planes = {
        (tuple(round(float(v), 4) for v in h.ImageOrientationPatient), int(h.Rows), int(h.Columns),
         tuple(round(float(v), 6) for v in h.get("PixelSpacing", [0, 0])))
        for h in headers
    }
    if len(planes) > 1:
        problems.append("slices differ in orientation, size or pixel spacing")
        return problems
    if "PixelSpacing" not in first:
        return ["no PixelSpacing"]
    row = np.asarray(first.ImageOrientationPatient[:3], dtype=np.float64)
    col = np.asarray(first.ImageOrientationPatient[3:], dtype=np.float64)
    normal = np.cross(row, col)
    positions = np.asarray([h.ImagePositionPatient for h in headers], dtype=np.float64)
    along = (positions - positions[0]) @ normal
    if len(headers) > 1:
        off_axis = np.linalg.norm((positions - positions[0]) - np.outer(along, normal), axis=1)
        if np.any(off_axis > TILT_TOLERANCE * np.abs(along) + 1e-3):
            angle = float(np.degrees(np.arctan2(off_axis[-1], abs(along[-1]) or 1.0)))
            problems.append(
                f"gantry-tilted: slice positions leave the slice normal by {angle:.2f} degrees "
                "(resample it to an untilted grid first)"
            )
        gaps = np.diff(along)
        if gaps.min() <= 1e-6:
            problems.append("two slices share one position (duplicate slices)")
        elif len(gaps) > 1 and gaps.max() - gaps.min() > SPACING_TOLERANCE * float(np.median(gaps)):
            problems.append(
                f"non-uniform slice spacing: gaps between slices from {gaps.min():.3g} to {gaps.max():.3g} mm "
                "(missing slices, or a series reconstructed with varying spacing)"
            )
    return problems


def _grid(headers: Sequence[Dataset]) -> Grid:
    first = headers[0]
    row = np.asarray(first.ImageOrientationPatient[:3], dtype=np.float64)
    col = np.asarray(first.ImageOrientationPatient[3:], dtype=np.float64)
    normal = np.cross(row, col)
    positions = np.asarray([h.ImagePositionPatient for h in headers], dtype=np.float64)
    along = positions @ normal
    if len(headers) > 1:
        dz = float(np.median(np.diff(along)))
    else:
        dz = float(first.get("SliceThickness", 1.0) or 1.0)
    dy, dx = (float(v) for v in first.PixelSpacing)  # PixelSpacing is (row spacing, column spacing)
    return Grid(
        shape=(int(first.Columns), int(first.Rows), len(headers)),
        spacing=(dx, dy, dz),
        origin=tuple(float(v) for v in positions[0]),
        direction=tuple(tuple(float(v) for v in r) for r in np.stack([row, col, normal], axis=1)),
    )
