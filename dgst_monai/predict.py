"""Lymph-node masks for CT scans with a bundle's ``inference.json``: the ``dgst-monai predict`` command.

Each mask is a NIfTI file with exactly the input's geometry (size, spacing, origin, direction): the bundle
resamples the scan for the network and inverts the prediction back to the input grid (``Invertd``). For a
DICOM series the same mask can come back as DICOM-SEG and / or RTSTRUCT referencing the series
(``output_format``; :class:`dgst_monai.transforms.SaveDicomd`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data.folder_layout import default_name_formatter

from dgst_monai.data.cases import VOLUME_SUFFIXES, case_id_from_path

__all__ = ["find_inputs", "input_datalist", "mask_name_formatter", "mask_path", "output_paths", "output_stem", "predict"]

logger = logging.getLogger(__name__)

MASK_EXTENSION = ".nii.gz"
#: file name endings of the DICOM outputs (after ``<case id>_<postfix>``)
DICOM_ENDINGS = {"dicom-seg": "_seg.dcm", "rtstruct": "_rtstruct.dcm"}


def _is_volume(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)  # a folder of none: one DICOM series


def find_inputs(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], formats: str | Sequence[str] = "nifti"
) -> list[str]:
    """The scans to segment, from files and folders.

    A file is taken as is. A folder holding volume files (NIfTI, NRRD, MetaImage) stands for those files
    (sorted; not recursive); any other folder holding files is one DICOM series.

    Args:
        paths: one path or a list of paths.
        formats: the output formats asked for; a DICOM one (``dicom-seg``, ``rtstruct``) needs every input to
            be a DICOM series folder.

    Returns:
        Absolute paths, in the order given.

    Raises:
        FileNotFoundError: a path does not exist, or is a folder without any file.
        ValueError: no path given.
        DicomError: an unknown format, a DICOM format for an input that is not a DICOM series, or a series that
            is not one regular volume.
    """
    from dgst_monai.bundle.config_values import output_formats
    from dgst_monai.dicom.series import DicomError
    from dgst_monai.dicom.writers import DICOM_FORMATS

    dicom = [f for f in output_formats(formats) if f in DICOM_FORMATS]
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
    not_series = [f for f in found if not os.path.isdir(f)]
    if dicom and not_series:
        raise DicomError(
            f"output format {', '.join(dicom)} needs DICOM series folders as input: {not_series[0]} is a volume "
            "file (DICOM-SEG and RTSTRUCT reference the source series' images); ask for nifti for it"
        )
    if dicom:
        from dgst_monai.dicom.writers import load_series

        for folder in found:
            load_series(folder)  # one regular CT series, or an error naming the folder, before any inference
    return found


def input_datalist(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
) -> list[dict[str, str]]:
    """``[{"image": scan}, ...]`` for the scans :func:`find_inputs` finds in ``paths``; an empty list for no
    path, so that an inference config parses (the model zoo's checks, a server) before any scan is given.

    Example::

        "dataset": {"_target_": "Dataset", "data": {"_target_": "dgst_monai.predict.input_datalist",
                    "paths": "@datalist"}, "transform": "@preprocessing"}
    """
    return [{"image": path} for path in find_inputs(paths)] if paths else []


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


def output_stem(source: str | os.PathLike[str], postfix: str = "lymph_nodes") -> str:
    """The file name stem of every output for ``source``: ``<case id>_<postfix>``."""
    return f"{_subject(source)}_{postfix}"


def mask_path(source: str | os.PathLike[str], output_dir: str | os.PathLike[str], postfix: str = "lymph_nodes") -> Path:
    """Where the bundle writes the mask of ``source``: ``<output_dir>/<case id>_<postfix>.nii.gz``."""
    return Path(output_dir) / f"{output_stem(source, postfix)}{MASK_EXTENSION}"


def output_paths(
    source: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    postfix: str = "lymph_nodes",
    formats: Sequence[str] = ("nifti",),
) -> list[Path]:
    """Every file the bundle writes for ``source`` in ``formats``: the NIfTI mask, ``..._seg.dcm``,
    ``..._rtstruct.dcm``."""
    stem = output_stem(source, postfix)
    return [
        mask_path(source, output_dir, postfix) if f == "nifti" else Path(output_dir) / f"{stem}{DICOM_ENDINGS[f]}"
        for f in formats
    ]


def predict(
    bundle: str | os.PathLike[str],
    input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],  # noqa: A002 - the CLI's --input
    output: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    mirror: bool = False,
    preset: str | None = None,
    format: str | Sequence[str] = "nifti",  # noqa: A002 - the CLI's --format
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
        format: ``nifti``, ``dicom-seg``, ``rtstruct``, comma-separated (the bundle's ``output_format``); the
            DICOM formats need DICOM series folders as inputs, checked before any inference.
        **overrides: further config overrides, as ``--key value`` of ``monai.bundle run`` (e.g.
            ``patch_size=[64, 64, 32]``, ``output_postfix="ln"``).

    Returns:
        The files written, in the order of the inputs (per input, in the order of ``format``).

    Raises:
        FileNotFoundError: missing bundle, checkpoint or input.
        TypeError: ``mirror`` is not a boolean.
        ValueError: two inputs would write the same mask file; a DICOM format for an input that is not a DICOM
            series; an unknown format.

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
    from dgst_monai.bundle.config_values import output_formats

    formats = output_formats(format)
    sources = find_inputs(input, formats)
    out_dir = Path(output).expanduser().resolve()
    postfix = overrides.get("output_postfix", "lymph_nodes")
    targets = [t for s in sources for t in output_paths(s, out_dir, postfix, formats)]
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
        output_format=",".join(formats),
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
