"""Lymph-node masks for CT scans with a bundle's ``inference.json``: the ``dgst-monai predict`` command.

Each mask is a NIfTI file with exactly the input's geometry (size, spacing, origin, direction): the bundle
resamples the scan for the network and inverts the prediction back to the input grid (``Invertd``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data.folder_layout import default_name_formatter

from dgst_monai.data.cases import VOLUME_SUFFIXES, case_id_from_path

__all__ = ["find_inputs", "mask_name_formatter", "mask_path", "predict"]

logger = logging.getLogger(__name__)

MASK_EXTENSION = ".nii.gz"


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)  # a folder of none: one DICOM series


def find_inputs(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The scans to segment, from files and folders.

    A file is taken as is. A folder holding volume files (NIfTI, NRRD, MetaImage) stands for those files
    (sorted; not recursive); any other folder holding files is one DICOM series.

    Args:
        paths: one path or a list of paths.

    Returns:
        Absolute paths, in the order given.

    Raises:
        FileNotFoundError: a path does not exist, or is a folder without any file.
        ValueError: no path given.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"input {item} does not exist (expected a NIfTI/NRRD file or a DICOM series folder)"
            )
        if path.is_dir():
            volumes = sorted(p for p in path.iterdir() if _is_volume(p))
            if volumes:
                found.extend(str(p.resolve()) for p in volumes)
            elif any(p.is_file() for p in path.iterdir()):
                found.append(str(path.resolve()))
            else:
                raise FileNotFoundError(
                    f"{path} holds no scan (no volume file, no DICOM file); pass the scan files or series folders"
                )
        else:
            found.append(str(path.resolve()))
    if not found:
        raise ValueError("no input scan given")
    return found


def _subject(source: str | os.PathLike[str]) -> str:
    """Output stem of an input: its case id, dots replaced (MONAI strips everything after a dot as an extension)."""
    return case_id_from_path(source).replace(".", "_")


def mask_name_formatter(metadict: dict[str, Any] | None, saver: Any) -> dict[str, Any]:
    """``SaveImaged(output_name_formatter=...)``: name each mask after its input's case id.

    ``/data/segrap_0001/image.nii.gz`` gives ``segrap_0001``, ``/data/LNQ2023_0007.nrrd`` gives
    ``LNQ2023_0007``, a DICOM series folder its folder name; without a source file name MONAI's default applies.

    Args:
        metadict: the prediction's meta data (``filename_or_obj``, ``patch_index``).
        saver: the ``SaveImage`` transform.
    """
    source = (metadict or {}).get("filename_or_obj")
    if not source:
        return default_name_formatter(metadict or {}, saver)
    return {"subject": _subject(source), "idx": (metadict or {}).get("patch_index")}


def mask_path(source: str | os.PathLike[str], output_dir: str | os.PathLike[str], postfix: str = "lymph_nodes") -> Path:
    """Where the bundle writes the mask of ``source``: ``<output_dir>/<case id>_<postfix>.nii.gz``."""
    return Path(output_dir) / f"{_subject(source)}_{postfix}{MASK_EXTENSION}"


def predict(
    bundle: str | os.PathLike[str],
    input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],  # noqa: A002 - the CLI's --input
    output: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    mirror: bool = False,
    preset: str | None = None,
    **overrides: Any,
) -> list[str]:
    """Segment lymph nodes in CT scans with a bundle's ``configs/inference.json``.

    Runs the bundle's inference workflow (MONAI ``ConfigWorkflow``, as ``python -m monai.bundle run`` does) on
    CPU or, if available, CUDA; the checkpoint is mapped to that device. The intensity normalisation is read
    from ``normalization.json`` beside the checkpoint (written by the bundle's training).

    Args:
        bundle: the bundle folder, e.g. ``bundles/ln_ct_dynunet``.
        input: scans: NIfTI or NRRD files, DICOM series folders, or folders of volume files
            (see :func:`find_inputs`).
        output: folder for the masks, ``<case id>_lymph_nodes.nii.gz`` (uint8, 1 = lymph node).
        checkpoint: model weights; default ``<bundle>/models/model.pt``.
        mirror: test-time mirroring (8 flips per window: about 8 times slower, usually slightly better).
        preset: the network preset the checkpoint was trained with (the bundle's ``preset`` key, e.g.
            ``cpu-small``); default the bundle's own.
        **overrides: further config overrides, as ``--key value`` of ``monai.bundle run`` (e.g.
            ``patch_size=[64, 64, 32]``, ``output_postfix="ln"``).

    Returns:
        The masks written, in the order of the inputs.

    Raises:
        FileNotFoundError: missing bundle, checkpoint or input.
        TypeError: ``mirror`` is not a boolean.
        ValueError: two inputs would write the same mask file.

    Example::

        predict("bundles/ln_ct_dynunet", ["ct/case1.nii.gz", "ct/dicom_series_2"], "masks", preset="cpu-small")
    """
    from monai.bundle import ConfigWorkflow

    if not isinstance(mirror, bool):  # a string such as 'false' would switch mirroring on
        raise TypeError(f"mirror must be True or False, got {mirror!r}")

    root = Path(bundle).expanduser().resolve()
    inference = root / "configs" / "inference.json"
    if not inference.is_file():
        raise FileNotFoundError(f"{root} is not a bundle with configs/inference.json")
    weights = Path(checkpoint).expanduser().resolve() if checkpoint else root / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {weights} not found; pass checkpoint=... (--checkpoint)")
    sources = find_inputs(input)
    out_dir = Path(output).expanduser().resolve()
    targets = [mask_path(s, out_dir, overrides.get("output_postfix", "lymph_nodes")) for s in sources]
    clashes = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashes:
        raise ValueError(
            f"several inputs would write the same mask file(s): {', '.join(clashes)}; segment them separately"
        )
    if preset is not None:
        overrides["preset"] = preset
    out_dir.mkdir(parents=True, exist_ok=True)
    workflow = ConfigWorkflow(
        config_file=str(inference),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type="infer",
        bundle_root=str(root),
        datalist=sources,
        output_dir=str(out_dir),
        checkpoint=str(weights),
        mirror=mirror,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    missing = [str(t) for t in targets if not t.is_file()]
    if missing:
        raise RuntimeError(f"inference finished but did not write {', '.join(missing)}")
    logger.info(f"wrote {len(targets)} mask(s) to {out_dir}")
    return [str(t) for t in targets]
