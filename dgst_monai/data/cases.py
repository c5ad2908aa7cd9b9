"""Case ids and volume file suffixes: the one rule that datalists, splits, reports and mask names share.

A datalist entry names its case with ``case_id`` (``dgst-monai data index`` and ``data synth`` always write
one, from the dataset's layout: ``LNQ2023_0007`` for ``LNQ2023_0007-ct.nrrd``). Entries without one get an id
derived from their image path by :func:`case_id_from_path`, and :func:`with_case_ids` writes it into the entry,
so that every batch carries its ``case_id`` and splits, few-shot subsets and evaluation reports name a case the
same way.

Example:
    >>> from dgst_monai.data.cases import case_id_from_path, case_id_of
    >>> case_id_from_path("/data/segrap_0001/image.nii.gz")
    'segrap_0001'
    >>> case_id_of({"case_id": "LNQ2023_0007", "image": "/data/LNQ2023_0007-ct.nrrd"})
    'LNQ2023_0007'
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import PurePath
from typing import Any

__all__ = [
    "CASE_ID_KEY",
    "GENERIC_STEMS",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "batch_case_ids",
    "case_id_from_path",
    "case_id_of",
    "has_volume_suffix",
    "strip_volume_suffix",
    "with_case_ids",
]

#: Key of the case id in datalist entries (and so in every batch).
CASE_ID_KEY = "case_id"

#: Suffixes of single-file volumes dgst_monai reads (NIfTI, NRRD, MetaImage); a folder is a DICOM series.
#: Longest first, so that ``.nii.gz`` is stripped whole. Matched case-insensitively.
VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: The NIfTI ones among them (``data check`` inspects NIfTI headers and voxel blocks itself).
NIFTI_SUFFIXES: tuple[str, ...] = VOLUME_SUFFIXES[:2]

#: File stems that name a role, not a case (``segrap_0001/image.nii.gz``): the parent folder is the case id.
GENERIC_STEMS: frozenset[str] = frozenset(
    {"image", "img", "ct", "image_contrast", "label", "labels", "seg", "segmentation", "mask", "data", "volume"}
)


def has_volume_suffix(name: str | os.PathLike[str]) -> bool:
    """Whether a file name ends with one of :data:`VOLUME_SUFFIXES` (any case).

    Example::

        has_volume_suffix("CT.NII.GZ")  # True
    """
    return PurePath(os.fspath(name)).name.lower().endswith(VOLUME_SUFFIXES)


def strip_volume_suffix(name: str) -> str:
    """``name`` without its volume suffix (unchanged if it has none, or is nothing but the suffix).

    Example::

        strip_volume_suffix("case_001.nii.gz")  # "case_001"
    """
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def case_id_from_path(path: str | os.PathLike[str], generic_stems: Collection[str] = GENERIC_STEMS) -> str:
    """Case id of an image path: the file name without its volume suffix, or the parent folder's name if that
    stem is generic.

    The datalist's own ``case_id`` takes precedence wherever there is one (:func:`case_id_of`): a path cannot
    know that ``LNQ2023_0007-ct.nrrd`` is case ``LNQ2023_0007``.

    Args:
        path: an image file, or a folder (a DICOM series).
        generic_stems: lower-case stems meaning "the image of this folder's case".

    Returns:
        e.g. ``case_001`` for ``/data/case_001.nii.gz``, ``segrap_0001`` for ``/data/segrap_0001/image.nii.gz``.

    Raises:
        ValueError: if ``path`` is empty.

    Example::

        case_id_from_path("/data/RADCURE-0001/")  # "RADCURE-0001" (a DICOM series folder)
    """
    p = PurePath(os.fspath(path))
    if not p.name:
        raise ValueError(f"cannot derive a case id from the empty path {path!r}.")
    stem = strip_volume_suffix(p.name)
    if stem.lower() in generic_stems and p.parent.name:
        return p.parent.name
    return stem


def case_id_of(entry: Mapping[str, Any], index: int = 0) -> str:
    """A datalist entry's case id: its ``case_id``, else derived from its image path, else ``#<index>``.

    Args:
        entry: a datalist entry (``image``: a path, or a list of paths whose first names the case).
        index: its position, for entries with neither.

    Example::

        case_id_of({"image": "imagesTr/hn_0003.nii.gz"})  # "hn_0003"
    """
    if entry.get(CASE_ID_KEY):
        return str(entry[CASE_ID_KEY])
    image = entry.get("image")
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if isinstance(image, (str, os.PathLike)) and os.fspath(image).rstrip("/\\"):
        return case_id_from_path(os.fspath(image).rstrip("/\\"))
    return f"#{index}"


def with_case_ids(entries: Iterable[Mapping[str, Any]], source: str = "datalist") -> list[dict[str, Any]]:
    """Copies of ``entries``, each with its ``case_id`` (:func:`case_id_of`), checked to be unique.

    Args:
        entries: datalist entries.
        source: what the entries come from, for the error message.

    Raises:
        ValueError: two entries have the same case id.

    Example::

        cases = with_case_ids(load_decathlon_datalist("datalist.json", True, "test"))
    """
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        cid = case_id_of(entry, i)
        if cid in seen:
            raise ValueError(
                f"{source}: entries #{seen[cid]} and #{i} have the same case id {cid!r}; give each entry its own "
                "`case_id` (run `dgst-monai data check`)"
            )
        seen[cid] = i
        out.append({**entry, CASE_ID_KEY: cid})
    return out


def batch_case_ids(batch: Any, key: str = CASE_ID_KEY) -> list[str] | None:
    """The case ids a batch carries under ``key``: collated (a dict of lists) or decollated (a list of dicts).

    Returns:
        One id per case, or None when the batch does not carry them (callers then fall back or refuse).

    Example:
        >>> batch_case_ids({"case_id": ["a", "b"], "image": None})
        ['a', 'b']
        >>> batch_case_ids([{"case_id": "a"}, {"case_id": "b"}])
        ['a', 'b']
    """
    if isinstance(batch, Mapping):
        ids = batch.get(key)
        if ids is None:
            return None
        return [str(c) for c in ids] if isinstance(ids, (list, tuple)) else [str(ids)]
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(b, Mapping) and key in b for b in batch):
        return [str(b[key]) for b in batch]
    return None
