"""Lymph-node labels from a hospital's DICOM: the ``dicom`` layout of ``dgst-monai data index``.

Under a folder of any depth, every RT Structure Set and DICOM Segmentation is paired with the CT series it
contours, through its references in this order: the referenced SeriesInstanceUID, the referenced image
(SOP Instance) UIDs, and the frame of reference when exactly one CT series has it. The ROIs (RTSTRUCT) and
segments (SEG) whose names match any of the ``--structures`` globs (case-insensitive, e.g. ``'LN*,*node*,GTVn*'``)
are united into one lymph-node label, rasterised once on the CT's exact grid.

Every series and every label object becomes a row of one table (:func:`format_table`) that says what was found,
what matched and why a case was left out: a structure set whose series is missing, no matching ROI, contours
outside the CT, two series claiming one case, a gantry-tilted or non-uniformly spaced series, a damaged file.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dgst_monai.dicom.rtstruct import rasterise_rois, roi_names
from dgst_monai.dicom.seg import rasterise_segments, segment_labels
from dgst_monai.dicom.series import CTSeries, DicomError, DicomFolder, LabelObject, scan

__all__ = [
    "CASE_IDS",
    "DicomCase",
    "collect_cases",
    "format_table",
    "match_structures",
    "parse_structures",
    "segmentation_to_label",
]

#: how a case is named: the DICOM PatientID, or the folder right under the indexed folder (one per patient)
CASE_IDS = ("patient", "folder")


def parse_structures(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"LN*,*node*"`` (or a list) -> the globs, stripped; empty ones dropped.

    Raises:
        DicomError: no pattern given.
    """
    items = value.split(",") if isinstance(value, str) else list(value or [])
    patterns = tuple(str(p).strip() for p in items if str(p).strip())
    if not patterns:
        raise DicomError(
            "--structures is required for DICOM labels: comma-separated globs on ROI / segment names, "
            "e.g. --structures 'LN*,*node*,GTVn*'"
        )
    return patterns


def match_structures(names: dict[int, str], patterns: Sequence[str]) -> dict[int, str]:
    """The entries of ``names`` (number -> name) matching any glob, case-insensitively."""
    lowered = [p.lower() for p in patterns]
    return {n: name for n, name in names.items() if any(fnmatch.fnmatchcase(name.lower(), p) for p in lowered)}


@dataclass
class LabelSource:
    """One label object paired with a series: the names it holds and those that matched."""

    obj: LabelObject
    names: dict[int, str]
    matched: dict[int, str]


@dataclass
class DicomCase:
    """A CT series and its label objects: one row group of the table, one case of the datalist when usable."""

    case_id: str
    series: CTSeries | None
    sources: list[LabelSource] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.series is not None and not self.problems and any(s.matched for s in self.sources)

    def write_label(self, path: Path) -> list[str]:
        """Rasterise the matched structures on the series' grid and write them to ``path`` (uint8, 1 = node).

        Returns:
            Problems (contours off the slices or outside the CT, frames off the grid); nothing is written then.
        """
        assert self.series is not None
        grid = self.series.grid
        cols, rows, slices = grid.shape
        label = np.zeros((slices, rows, cols), dtype=np.uint8)
        problems = []
        for source in self.sources:
            if not source.matched:
                continue
            raster = rasterise_rois if source.obj.kind == "RTSTRUCT" else rasterise_segments
            try:
                mask, found = raster(source.obj, list(source.matched), grid)
            except ValueError as err:
                problems.append(str(err))
                continue
            problems.extend(f"{source.obj.path}: {p}" for p in found)
            label |= mask
        if problems:
            return problems
        image = sitk.GetImageFromArray(label)
        geometry = grid.sitk_geometry()
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), useCompression=True)
        return []


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def _pair(obj: LabelObject, found: DicomFolder) -> tuple[CTSeries | None, str]:
    """The series ``obj`` contours, or None and why."""
    series = list(found.series.values())
    by_uid = [s for s in series if s.uid in obj.series_uids]
    if by_uid:
        return by_uid[0], ""
    instances = obj.instance_uids
    by_image = [s for s in series if instances & set(s.sop_instance_uids)]
    if len(by_image) == 1:
        return by_image[0], ""
    if len(by_image) > 1:
        names = ", ".join(s.description for s in by_image)
        return None, f"the images it references are in {len(by_image)} CT series (copies of one series?): {names}"
    frames = obj.frame_of_reference_uids
    by_frame = [s for s in series if s.frame_of_reference_uid in frames]
    if len(by_frame) == 1:
        return by_frame[0], ""
    if len(by_frame) > 1:
        names = ", ".join(s.description for s in by_frame)
        return None, f"its references name no series, and {len(by_frame)} CT series share its frame of reference: {names}"
    wanted = ", ".join(sorted(obj.series_uids)) or "no series UID"
    return None, (
        f"the CT series it references ({wanted}; frame of reference {', '.join(sorted(frames)) or 'none'}) is not "
        "under the indexed folder"
    )


def collect_cases(
    root: str | os.PathLike[str], structures: str | Sequence[str], case_id: str = "patient"
) -> tuple[list[DicomCase], list[str]]:
    """Pair label objects with CT series under ``root`` and match their structures.

    Args:
        root: the folder to search (any depth).
        structures: globs on ROI / segment names (see :func:`parse_structures`).
        case_id: ``patient`` (PatientID; when empty, as ``folder``) or ``folder`` (the folder right under
            ``root`` holding the series).

    Returns:
        One :class:`DicomCase` per CT series that has a label object, plus orphan label objects (``series``
        None), and notes (damaged files, unlabelled series).
    """
    if case_id not in CASE_IDS:
        raise DicomError(f"case_id must be one of {', '.join(CASE_IDS)}, got {case_id!r}")
    patterns = parse_structures(structures)
    base = Path(root).expanduser().resolve()
    found = scan(base)
    notes = [f"damaged DICOM file {path}: {why}" for path, why in found.unreadable]
    cases: dict[str, DicomCase] = {}
    orphans: list[DicomCase] = []
    for obj in found.labels:
        names = roi_names(obj) if obj.kind == "RTSTRUCT" else segment_labels(obj)
        source = LabelSource(obj, names, match_structures(names, patterns))
        series, why = _pair(obj, found)
        if series is None:
            patient = str(obj.dataset.get("PatientID", "") or "").strip() or obj.path.stem
            orphans.append(DicomCase(_safe_id(patient), None, [source], [f"{obj.path}: {why}"]))
            continue
        if series.uid not in cases:
            cases[series.uid] = DicomCase(_case_name(series, base, case_id), series)
        cases[series.uid].sources.append(source)
    for uid, series in found.series.items():
        if uid not in cases:
            notes.append(f"{series.description}: no structure set or segmentation references it (not a case)")
    claimed: dict[str, list[DicomCase]] = {}
    for case in cases.values():
        claimed.setdefault(case.case_id, []).append(case)
        _check_case(case, found, patterns)
    for case_name, group in claimed.items():
        if len(group) > 1:
            names = "; ".join(c.series.description for c in group if c.series is not None)
            for case in group:
                case.problems.append(f"{len(group)} series claim case {case_name}: {names}")
    return [*cases.values(), *orphans], notes


def _case_name(series: CTSeries, base: Path, case_id: str) -> str:
    """PatientID, or (``folder``, or no PatientID) the folder under ``base`` that holds the series."""
    patient = str(series.first.get("PatientID", "") or "").strip()
    if case_id == "patient" and patient:
        return _safe_id(patient)
    relative = series.folder.resolve().relative_to(base)
    return _safe_id(relative.parts[0] if relative.parts else base.name)


def _check_case(case: DicomCase, found: DicomFolder, patterns: Sequence[str]) -> None:
    series = case.series
    assert series is not None
    case.problems.extend(f"{series.description}: {p}" for p in series.problems)
    if len(series.folders) > 1:
        case.problems.append(f"{series.description}: its slices are spread over several folders; keep one per folder")
    rivals = [
        s for s in found.series.values()
        if s is not series and series.folder in s.folders and len(s.files) >= len(series.files)
    ]
    if rivals:
        case.problems.append(
            f"{series.folder} also holds {rivals[0].description}, as large; put each series in a folder of its own"
        )
    damaged = [p for p, _ in found.unreadable if p.parent == series.folder]
    if damaged:
        case.problems.append(f"damaged DICOM file {damaged[0]} in the series' folder")
    if not any(s.matched for s in case.sources):
        listed = sorted({n for s in case.sources for n in s.names.values()})
        case.problems.append(
            f"no ROI / segment matches --structures '{','.join(patterns)}' (found: {', '.join(listed) or 'none'})"
        )


def format_table(cases: Sequence[DicomCase], status: Callable[[DicomCase], str | None] | None = None) -> str:
    """One line per (case, label object): case, CT series, the object, names found, names matched, status."""
    header = ("case", "CT series", "label object", "names found", "matched", "status")
    rows = []
    for case in cases:
        ct = f"{case.series.folder} ({len(case.series.files)} slices)" if case.series is not None else "-"
        state = status(case) if status is not None else None
        if state is None:
            state = "used" if case.usable else "skipped: " + "; ".join(case.problems)
        for source in case.sources or [None]:
            obj = f"{source.obj.kind} {source.obj.path.name}" if source else "-"
            names = ", ".join(source.names.values()) if source else ""
            matched = ", ".join(source.matched.values()) if source else ""
            rows.append((case.case_id, ct, obj, names or "-", matched or "-", state))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(r[:-1], widths)) + "  " + str(r[-1]))
    return "\n".join(lines)



def segmentation_to_label(seg: str | os.PathLike[str], series: CTSeries, target: Path) -> list[str]:
    """Every segment of a DICOM-SEG file (a corrected label from a viewer) as one label volume on ``series``' grid.

    Returns:
        Problems (not a segmentation, frames off the grid or outside the CT); nothing is written then.
    """
    import pydicom

    path = Path(seg)
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # noqa: BLE001 - any parse failure is a damaged upload
        return [f"{path.name}: not a readable DICOM file ({type(err).__name__})"]
    obj = LabelObject(path, ds, "SEG")
    if str(ds.get("Modality", "")) != "SEG":
        return [f"{path.name}: a DICOM {ds.get('Modality', 'object')} file, not a segmentation (SEG)"]
    segments = segment_labels(obj)
    return DicomCase(path.stem, series, [LabelSource(obj, segments, segments)]).write_label(target)
