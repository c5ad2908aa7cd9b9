"""DICOM Segmentations: segments placed on a CT grid by their frames' own positions, and a mask written as SEG.

Reading works on the data set itself (pydicom): each frame carries its plane position (per-frame functional
groups), its plane orientation and pixel spacing (per-frame or shared), and, for BINARY and FRACTIONAL
segmentations, the segment it belongs to. A frame is placed at the CT voxel its position maps to; frames must
share the CT's in-plane axes and spacing and fall on its slices. FRACTIONAL values count from half the maximum
fractional value; a LABELMAP segmentation's pixel values are segment numbers.

Writing uses highdicom: one BINARY segment "Lymph node" (SNOMED CT 59441001, category anatomical structure),
algorithm type AUTOMATIC with our name and version, referencing every source slice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dgst_monai.dicom.series import CTSeries, Grid, LabelObject

__all__ = ["rasterise_segments", "segment_labels", "segmentation"]

#: frame origins may stray this far (in voxels) from the CT grid's voxel centres
GRID_TOLERANCE = 0.05


def segment_labels(obj: LabelObject) -> dict[int, str]:
    """Segment number -> segment label of a segmentation."""
    return {
        int(seg.SegmentNumber): str(seg.get("SegmentLabel", "") or "").strip()
        for seg in obj.dataset.get("SegmentSequence", [])
    }


def _group_item(frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    for group in (frame, shared):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence].value[0]
    return None


def rasterise_segments(obj: LabelObject, numbers: Sequence[int], grid: Grid) -> tuple[np.ndarray, list[str]]:
    """The union of segments ``numbers`` on ``grid`` as a (slices, rows, columns) uint8 array, and problems.

    Raises:
        ValueError: the pixel data cannot be decoded (the message names the file).
    """
    ds = obj.dataset
    cols, rows, slices = grid.shape
    mask = np.zeros((slices, rows, cols), dtype=bool)
    problems: list[str] = []
    kind = str(ds.get("SegmentationType", "BINARY")).strip().upper()
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as err:  # noqa: BLE001 - pydicom's decoders raise many kinds
        raise ValueError(f"{obj.path}: cannot decode the segmentation's pixel data ({err})") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = pixels.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    shared_seq = ds.get("SharedFunctionalGroupsSequence", [])
    shared = shared_seq[0] if len(shared_seq) else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []))
    wanted = set(numbers)
    for f in range(n_frames):
        frame = per_frame[f] if f < len(per_frame) else None
        if kind != "LABELMAP":
            ident = _group_item(frame, shared, "SegmentIdentificationSequence")
            if ident is None or int(ident.ReferencedSegmentNumber) not in wanted:
                continue
        values = pixels[f]
        if kind == "FRACTIONAL":
            on = values.astype(np.float64) * 2 >= float(ds.get("MaximumFractionalValue", 255))
        elif kind == "LABELMAP":
            on = np.isin(values, list(wanted))
        else:
            on = values > 0
        problem = _place_frame(on, frame, shared, grid, mask)
        if problem:
            problems.append(f"frame {f + 1}: {problem}")
    return mask.astype(np.uint8), _summarised(problems)


def _place_frame(on: np.ndarray, frame: Dataset | None, shared: Dataset | None, grid: Grid, mask: np.ndarray) -> str:
    """OR one frame's segment voxels into ``mask`` at the CT voxels its plane position maps to; or say why not."""
    position = _group_item(frame, shared, "PlanePositionSequence")
    orientation = _group_item(frame, shared, "PlaneOrientationSequence")
    measures = _group_item(frame, shared, "PixelMeasuresSequence")
    if position is None or orientation is None or measures is None:
        return "no plane position, orientation or pixel spacing"
    direction = np.asarray(grid.direction)
    cosines = np.asarray(orientation.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(measures.PixelSpacing, dtype=np.float64)[::-1]  # (column spacing, row spacing)
    if (
        np.abs(cosines[:3] - direction[:, 0]).max() > 1e-4
        or np.abs(cosines[3:] - direction[:, 1]).max() > 1e-4
        or np.abs(spacing - np.asarray(grid.spacing[:2])).max() > 1e-3 * max(grid.spacing[:2])
    ):
        return (
            f"orientation {cosines.round(4).tolist()} and pixel spacing {spacing.tolist()} are not the CT's "
            f"({direction[:, :2].T.ravel().round(4).tolist()}, {list(grid.spacing[:2])})"
        )
    c0, r0, k = grid.to_index(np.asarray(position.ImagePositionPatient, dtype=np.float64)[None])[0]
    ci, ri, ki = round(c0), round(r0), round(k)
    if max(abs(c0 - ci), abs(r0 - ri), abs(k - ki)) > GRID_TOLERANCE:
        return f"not on the CT's voxel grid (voxel index {c0:.2f}, {r0:.2f}, {k:.2f})"
    if not on.any():
        return ""
    slices, rows, cols = mask.shape
    if not 0 <= ki < slices:
        return f"outside the CT (slice {ki} of {slices})"
    rr, cc = np.nonzero(on)
    rr, cc = rr + ri, cc + ci  # a frame larger than the CT is fine where its segment stays inside
    if rr.min() < 0 or cc.min() < 0 or rr.max() >= rows or cc.max() >= cols:
        return f"segment voxels outside the CT's {cols} x {rows} slice"
    mask[ki, rr, cc] = True
    return ""


def _summarised(problems: list[str]) -> list[str]:
    """One line per kind of frame problem: "12 frames are not on ... (first: frame 3 ...)"."""
    kinds: dict[str, list[str]] = {}
    for problem in problems:
        kinds.setdefault(re.sub(r"[-\d.]+", "#", problem.split(": ", 1)[-1]), []).append(problem)
    out = []
    for group in kinds.values():
        out.append(group[0] if len(group) == 1 else f"{len(group)} frames with problems like this one: {group[0]}")
    return out


def segmentation(
    mask: np.ndarray,
    series: CTSeries,
    *,
    series_number: int,
    software: tuple[str, str],
    segment_label: str = "Lymph node",
) -> Dataset:
    """A BINARY DICOM Segmentation of ``mask`` (slices, rows, columns) on ``series`` (highdicom).

    Every slice is written (empty ones too), so an empty mask gives a valid object with an empty segment.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    grid = series.grid
    if mask.shape != (grid.shape[2], grid.shape[1], grid.shape[0]):
        raise ValueError(f"mask shape {mask.shape} is not the series' (slices, rows, columns) {grid.shape[::-1]}")
    name, version = software
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=segment_label,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=hd.sr.CodedConcept("59441001", "SCT", "Lymph node"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=name, version=version, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    quiet = logging.getLogger("highdicom")  # it logs every copied module at INFO, which bundle logging shows
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        return _segmentation(hd, description, mask, series, series_number, name, version)
    finally:
        quiet.setLevel(level)


def _segmentation(
    hd: Any, description: Any, mask: np.ndarray, series: CTSeries, series_number: int, name: str, version: str
) -> Dataset:
    from pydicom.uid import generate_uid

    return hd.seg.Segmentation(
        source_images=series.headers_with_uids(),
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=name,
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number="not applicable",
        series_description="Lymph nodes (automatic)",
        omit_empty_frames=False,
    )
