"""Validate every case of a datalist and report all problems at once (``dgst-monai data check``).

Checks, per case (image and label), in order of cost:

1. entries: ``image`` / ``label`` present and path strings; files exist; duplicate case ids and duplicate
   image files across all lists;
2. headers only (SimpleITK ``ReadImageInformation``; per-slice headers for a DICOM series): readable; a 3-D
   scalar volume with more than one slice; positive, finite spacing (for NIfTI also the raw ``pixdim``, which
   ITK silently replaces by 1 when it is 0); a non-degenerate direction; regular DICOM slice positions; image /
   label geometry (size, spacing, origin, direction) equal within tolerances;
3. file integrity: voxel data complete and intact (ITK reads a truncated NIfTI without complaint and decodes a
   corrupt gzip stream unchecked: :func:`dgst_monai.data.integrity.check_image_file` compares the byte count
   with the header and verifies gzip / zlib / bzip2 streams of NIfTI, NRRD and MetaImage files);
4. voxels: readable; no NaN / inf; image values on the CT (HU) scale; label values integers among the
   datalist's ``labels`` (default 0, 1); a non-empty label in every training case.

Nothing is ever written: the source data are read-only here.

Example:
    >>> from dgst_monai.data.validate import check_datalist, format_problems
    >>> problems = check_datalist("datalist.json")  # doctest: +SKIP
    >>> print(format_problems(problems))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from dgst_monai.data.cases import NIFTI_SUFFIXES, case_id_of
from dgst_monai.data.integrity import check_image_file, read_nifti_header
from dgst_monai.data.readers import SLICE_GAP_TOLERANCE, Geometry, read_header, read_image
from dgst_monai.files import DamagedFileError

__all__ = ["Problem", "Tolerances", "check_datalist", "format_problems"]


@dataclass(frozen=True)
class Problem:
    """One problem of one case: what ``data check`` prints as a table row."""

    case_id: str
    split: str
    file: str
    problem: str


@dataclass(frozen=True)
class Tolerances:
    """Thresholds of :func:`check_datalist`.

    Attributes:
        spacing_rel: relative spacing difference allowed between image and label.
        origin_mm: origin difference allowed between image and label (mm, per axis).
        direction: direction cosine difference allowed between image and label.
        slice_gap_rel: relative spread of DICOM slice gaps allowed (larger means missing / duplicate slices).
        air_hu: the darkest image voxel must be below this (air or fat): otherwise the image is not in HU
            (e.g. stored values without the DICOM rescale) or was already normalised.
        hu_min: lowest plausible CT value (scanners pad outside the field of view with -1024, -2048 or -3024).
        hu_max: highest plausible CT value (extended-scale metal reaches about 30000).
    """

    spacing_rel: float = 1e-3
    origin_mm: float = 1e-2
    direction: float = 1e-3
    slice_gap_rel: float = SLICE_GAP_TOLERANCE
    air_hu: float = -200.0
    hu_min: float = -3100.0
    hu_max: float = 32767.0


def check_datalist(
    datalist: str | os.PathLike[str],
    tolerances: Tolerances | None = None,
    label_values: set[int] | None = None,
    progress: Callable[[str], None] | None = None,
    voxels: bool = True,
    required: str = "training",
) -> list[Problem]:
    """All problems of all cases of every list (``training``, ``validation``, ``test``, ...) of a datalist.

    Args:
        datalist: MONAI datalist JSON; relative paths are relative to its folder.
        tolerances: thresholds (defaults: :class:`Tolerances`).
        label_values: allowed label values; default the integer keys of the datalist's ``labels``, else {0, 1}.
        progress: called with one line per case checked.
        voxels: also read the voxel data (step 4); False checks entries, headers and file sizes only.
        required: the list that must hold cases (``training``; ``test`` for a datalist that is only scored).

    Returns:
        Problems in datalist order; empty when everything is fine.
    """
    tol = tolerances or Tolerances()
    path = Path(datalist)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [Problem("-", "-", str(path), "datalist file does not exist")]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [Problem("-", "-", str(path), f"datalist is not readable JSON: {err}")]
    if not isinstance(content, dict):
        return [Problem("-", "-", str(path), "datalist is not a JSON object")]
    lists = {k: v for k, v in content.items() if isinstance(v, list) and k not in ("skipped",)}
    lists = {
        k: v
        for k, v in lists.items()
        if k in ("training", "validation", "test") or any(isinstance(e, dict) and "image" in e for e in v)
    }
    if not lists.get(required):
        return [Problem("-", "-", str(path), f"datalist has no (non-empty) {required!r} list")]
    if label_values is None:
        labels = content.get("labels")
        keys = [int(k) for k in labels if str(k).isdigit()] if isinstance(labels, dict) else []
        label_values = set(keys) if keys else {0, 1}
    base = path.resolve().parent

    problems: list[Problem] = []
    seen_ids: dict[str, str] = {}
    seen_images: dict[str, str] = {}
    for split, entries in lists.items():
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                kind = type(entry).__name__
                text = f"entry is {kind}, expected an object with image and label"
                problems.append(Problem(f"#{i}", split, "-", text))
                continue
            cid = case_id_of(entry, i)
            where = f"{split} #{i}"
            if cid in seen_ids:
                image_name = str(entry.get("image", "-"))
                problems.append(Problem(cid, split, image_name, f"duplicate case id (also {seen_ids[cid]})"))
            else:
                seen_ids[cid] = where
            image = entry.get("image")
            if isinstance(image, str):
                resolved = os.path.normpath(base / image)
                if resolved in seen_images and seen_images[resolved] != cid:
                    problems.append(Problem(cid, split, image, f"same image file as case {seen_images[resolved]}"))
                elif resolved not in seen_images:
                    seen_images[resolved] = cid
            problems.extend(_check_case(cid, split, entry, base, tol, label_values, voxels))
            if progress is not None:
                progress(f"checked {split} {cid}")
    return problems


def _check_case(
    cid: str, split: str, entry: dict[str, Any], base: Path, tol: Tolerances, label_values: set[int], voxels: bool
) -> list[Problem]:
    out: list[Problem] = []

    def add(file: Any, text: str) -> None:
        out.append(Problem(cid, split, str(file), text))

    paths: dict[str, Path] = {}
    for key in ("image", "label"):
        value = entry.get(key)
        if value is None:
            add("-", f"no {key!r} entry")
        elif not isinstance(value, str) or not value:
            add(value, f"{key!r} must be one path string, got {value!r}")
        else:
            p = Path(value) if Path(value).is_absolute() else base / value
            if not p.exists():
                add(value, f"missing file: {key} {p} does not exist")
            else:
                paths[key] = p

    headers: dict[str, Geometry] = {}
    for key, p in paths.items():
        try:
            geom = read_header(p)
        except Exception as err:  # noqa: BLE001 - every reader failure is a finding, not a crash
            add(p, f"unreadable {key}: {err}")
            continue
        found = _header_problems(key, p, geom, tol)
        for text in found:
            add(p, text)
        damaged = _integrity_problem(key, p) if p.is_file() else None
        if damaged:
            add(p, damaged)
        if not found and not damaged:
            headers[key] = geom

    if "image" in headers and "label" in headers:
        for text in _geometry_mismatch(headers["image"], headers["label"], tol):
            add(paths["label"], text)

    for key in headers if voxels else ():  # voxels only of files whose header is sound
        try:
            array = _voxels(paths[key])
        except Exception as err:  # noqa: BLE001
            add(paths[key], f"unreadable or truncated {key} voxel data: {err}")
            continue
        if key == "image":
            texts = _image_problems(array, tol)
        else:
            texts = _label_problems(array, label_values, split == "training")
        for text in texts:
            add(paths[key], text)
    return out


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _voxels(path: Path) -> np.ndarray:
    """The voxel values as stored: nibabel for NIfTI (ITK's NIfTI reader turns NaN and inf into 0, MONAI's
    default NIfTI reader does not), SimpleITK otherwise (axis order does not matter to the checks)."""
    if _is_nifti(path):
        import nibabel as nib

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asanyarray(nib.load(str(path)).dataobj)
    return sitk.GetArrayFromImage(read_image(path))


def _header_problems(key: str, path: Path, g: Geometry, tol: Tolerances) -> list[str]:
    out: list[str] = []
    if g.dimension != 3:
        out.append(f"{key} is not a 3-D image: {g.dimension}-D, size {list(g.size)}")
        return out
    if min(g.size) < 2:
        out.append(f"{key} is not a 3-D volume: size {list(g.size)} (a single slice)")
    if g.components != 1:
        out.append(f"{key} has {g.components} components per voxel (vector / RGB), expected a scalar volume")
    spacing = _nifti_pixdim(path) or g.spacing  # ITK turns a zero pixdim into 1: read the header's own value
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        out.append(f"{key} has zero or negative spacing {_fmt(spacing)}")
    direction = np.asarray(g.direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        out.append(f"{key} has a degenerate direction matrix {np.round(direction, 4).tolist()}")
    if len(g.slice_positions) > 2:
        gaps = np.diff(np.asarray(g.slice_positions))
        if gaps.min() <= 1e-6:
            out.append(f"{key} DICOM series has duplicate slice positions ({int(np.sum(gaps <= 1e-6))} slices)")
        elif (gaps.max() - gaps.min()) > tol.slice_gap_rel * float(np.median(gaps)):
            out.append(
                f"{key} DICOM series has irregular slice spacing: gaps {gaps.min():.3g} to {gaps.max():.3g} mm "
                "(missing slices?)"
            )
    return out


def _geometry_mismatch(img: Geometry, lab: Geometry, tol: Tolerances) -> list[str]:
    out: list[str] = []
    if img.size != lab.size:
        return [f"geometry mismatch: label size {list(lab.size)} != image size {list(img.size)}"]
    if any(abs(a - b) > tol.spacing_rel * max(abs(a), abs(b)) for a, b in zip(img.spacing, lab.spacing)):
        out.append(f"geometry mismatch: label spacing {_fmt(lab.spacing)} != image spacing {_fmt(img.spacing)}")
    if any(abs(a - b) > tol.origin_mm for a, b in zip(img.origin, lab.origin)):
        out.append(f"geometry mismatch: label origin {_fmt(lab.origin)} != image origin {_fmt(img.origin)} (mm)")
    if any(abs(a - b) > tol.direction for a, b in zip(img.direction, lab.direction)):
        out.append(f"geometry mismatch: label direction {_fmt(lab.direction)} != image direction {_fmt(img.direction)}")
    return out


def _image_problems(array: np.ndarray, tol: Tolerances) -> list[str]:
    out: list[str] = []
    values = array
    if np.issubdtype(array.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if n_nan or n_inf:
            out.append(f"image has {n_nan} NaN and {n_inf} infinite voxels")
            values = array[np.isfinite(array)]
    if values.size == 0:
        return out
    lo, hi = float(values.min()), float(values.max())
    if lo < tol.hu_min or hi > tol.hu_max:
        out.append(f"implausible HU range [{lo:g}, {hi:g}]: outside the CT scale [{tol.hu_min:g}, {tol.hu_max:g}]")
    elif lo > tol.air_hu:
        out.append(
            f"implausible HU range [{lo:g}, {hi:g}]: no voxel below {tol.air_hu:g} HU (no air or fat), so the "
            "values are not HU (DICOM rescale missing?) or were already normalised"
        )
    return out


def _label_problems(array: np.ndarray, allowed: set[int], training: bool) -> list[str]:
    out: list[str] = []
    if training and not np.any(array > 0):  # before any rounding: a 0.4 is still a (bad) foreground value
        out.append("empty label (no voxel > 0) in a training case")
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            out.append(f"label has {int((~finite).sum())} NaN / infinite voxels")
            array = array[finite]
        fractional = array != np.round(array)
        if fractional.any():
            example = float(array[fractional].flat[0])
            count = int(fractional.sum())
            out.append(f"label has non-integer values ({count} voxels, e.g. {example:g}): not a label map")
            array = np.round(array)
        array = array.astype(np.int64)
    if array.size == 0:
        return out
    lo, hi = int(array.min()), int(array.max())
    if lo >= 0 and hi < 65536:  # bincount is much faster than unique on large volumes
        present = set(np.flatnonzero(np.bincount(array.ravel())).tolist())
    else:
        present = set(np.unique(array).tolist())
    unexpected = sorted(present - allowed)
    if unexpected:
        shown = ", ".join(str(v) for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
        out.append(f"unexpected label values {shown} (allowed: {', '.join(str(v) for v in sorted(allowed))})")
    return out


def _nifti_pixdim(path: Path) -> tuple[float, float, float] | None:
    """The raw ``pixdim[1:4]`` of a NIfTI header (None for other formats or an unreadable header)."""
    if not _is_nifti(path):
        return None
    try:
        pixdim = read_nifti_header(path)["pixdim"][1:4]
    except DamagedFileError:  # the integrity check reports it
        return None
    return tuple(float(v) for v in pixdim)  # type: ignore[return-value]


def _integrity_problem(key: str, path: Path) -> str | None:
    """How the voxel data of a file are truncated or corrupt (None if they are complete, or not checkable)."""
    try:
        check_image_file(path)
    except DamagedFileError as err:
        return f"unreadable or truncated {key} voxel data: " + str(err).removeprefix(f"{path}: ")
    return None


def _fmt(values: Any) -> str:
    return "[" + ", ".join(f"{v + 0.0:.6g}" for v in values) + "]"  # + 0.0 turns -0 into 0


def format_problems(problems: list[Problem], base: str | os.PathLike[str] | None = None) -> str:
    """A plain-text table (case | split | file | problem), files shown relative to ``base`` when inside it."""
    if not problems:
        return "no problems found"

    def short(file: str) -> str:
        if base is None or file in ("-", ""):
            return file
        try:
            return os.path.relpath(file, base) if Path(file).is_absolute() else file
        except ValueError:
            return file

    rows = [("case", "split", "file", "problem")] + [(p.case_id, p.split, short(p.file), p.problem) for p in problems]
    widths = [min(max(len(r[c]) for r in rows), cap) for c, cap in zip(range(3), (28, 10, 60))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            row[c].ljust(widths[c]) if len(row[c]) <= widths[c] else "..." + row[c][-(widths[c] - 3) :]
            for c in range(3)
        ]
        lines.append("  ".join(cells + [row[3]]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    cases = len({(p.case_id, p.split) for p in problems})
    lines.append(f"{len(problems)} problem(s) in {cases} case(s)")
    return "\n".join(lines)
