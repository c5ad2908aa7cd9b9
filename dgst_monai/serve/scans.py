"""Checks of what a client sends the server: a scan to segment and a label to fine-tune on.

ITK, which MONAI's and our readers use, reads a truncated NIfTI without complaint and fills the missing voxels
with zeros: a cut-off upload would be segmented as if it were whole. A scan's voxel data are therefore checked
against its header before it is segmented (:func:`dgst_monai.data.integrity.check_image_file`), and every
failure becomes a :class:`ScanError` naming the file and the problem, which the server answers with HTTP 422.
A label is checked by ``dgst-monai data check``'s rules against its image.

Example::

    from dgst_monai.serve.scans import ScanError, check_scan

    try:
        check_scan("upload.nii.gz")
    except ScanError as err:
        print(err)   # upload.nii.gz: truncated or corrupt voxel data (...)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from dgst_monai.data.integrity import check_image_file
from dgst_monai.data.readers import Geometry, read_header
from dgst_monai.data.validate import check_datalist
from dgst_monai.files import atomic_write_json

__all__ = [
    "DATALIST_LABELS",
    "UPLOAD_SUFFIXES",
    "ScanError",
    "check_label",
    "check_scan",
    "check_study",
    "upload_suffix",
]

#: Single-file volume formats a client may upload (a DICOM series or a detached header is several files).
UPLOAD_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")

#: The label values of a lymph-node datalist: what a submitted label may hold.
DATALIST_LABELS = {"0": "background", "1": "lymph_node"}


class ScanError(ValueError):
    """A scan or label the server cannot use; the message names the file and the problem (HTTP 422)."""


def upload_suffix(filename: str | None) -> str:
    """The volume suffix of an uploaded file's name.

    Raises:
        ScanError: no name, or not one of :data:`UPLOAD_SUFFIXES`.
    """
    lower = (filename or "").lower()
    for suffix in UPLOAD_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise ScanError(
        f"upload {filename!r}: unsupported file type; send one volume file ending in {', '.join(UPLOAD_SUFFIXES)}"
    )


def check_scan(path: str | os.PathLike[str], name: str | None = None) -> Geometry:
    """Check that ``path`` is a readable 3-D scalar volume whose voxel data are complete; return its geometry.

    Args:
        path: the file.
        name: how to name it in the message (an upload's original file name); default the file name.

    Raises:
        ScanError: unreadable header, not a 3-D scalar volume, or truncated / corrupt voxel data.
    """
    p = Path(path)
    shown = name or p.name

    def reason(err: Exception) -> str:  # the reader's words, without the server's own file names
        text = str(err).replace(f"{p}: ", "").replace(f'"{p}"', "it").replace(str(p), "it")
        return " ".join(text.replace(p.name, shown).split())

    try:
        geometry = read_header(p)
    except (OSError, RuntimeError) as err:
        raise ScanError(f"{shown}: not a readable image ({reason(err)})") from None
    if geometry.dimension != 3 or min(geometry.size) < 2 or geometry.components != 1:
        raise ScanError(
            f"{shown}: expected a 3-D scalar CT volume, got size {list(geometry.size)} with "
            f"{geometry.components} value(s) per voxel"
        )
    if p.is_dir():  # a DICOM series (a PACS study): every instance complete, one regular volume
        from dgst_monai.dicom.series import scan

        found = scan(p)
        if found.unreadable:
            damaged = "; ".join(f"instance {path.stem}: {why}" for path, why in found.unreadable)
            raise ScanError(f"{shown}: damaged DICOM data: {damaged}")
        problems = [f"{s.description}: {'; '.join(s.problems)}" for s in found.series.values() if s.problems]
        if problems:
            raise ScanError(f"{shown}: {'; '.join(problems)}")
        return geometry
    try:
        check_image_file(p)
    except (OSError, RuntimeError) as err:  # DamagedFileError is a RuntimeError
        raise ScanError(f"{shown}: truncated or corrupt voxel data ({reason(err)})") from None
    return geometry


@functools.lru_cache(maxsize=1024)
def _checked_study(path: str, size: int, mtime_ns: int) -> Geometry:
    return check_scan(path)


def check_study(path: str | os.PathLike[str]) -> Geometry:
    """:func:`check_scan` for a study of the datastore, read once per version of the file.

    Raises:
        ScanError: as :func:`check_scan`.
    """
    stat = os.stat(path)
    return _checked_study(str(path), stat.st_size, stat.st_mtime_ns)


def check_label(image: str | os.PathLike[str], label: str | os.PathLike[str], name: str | None = None) -> None:
    """Check a label for fine-tuning against its image, by the rules of ``dgst-monai data check``.

    The label must be readable and complete, have the image's geometry (size, spacing, origin, direction) and
    hold only the values 0 and 1, with at least one lymph-node voxel.

    Args:
        image: the study's image.
        label: the label file; a datalist of the pair is written beside it while checking.
        name: how to name the label in the message; default its file name.

    Raises:
        ScanError: every problem found, in one message.
    """
    label_path = Path(label)
    datalist = label_path.with_name(f".{label_path.name}.check.json")
    pair = {"image": str(image), "label": str(label_path)}
    atomic_write_json(datalist, {"labels": DATALIST_LABELS, "training": [pair]})
    try:
        problems = check_datalist(datalist)
    finally:
        datalist.unlink(missing_ok=True)
    if problems:
        shown = name or label_path.name
        raise ScanError(f"label {shown}: " + "; ".join(p.problem for p in problems))
