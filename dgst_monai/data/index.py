"""Build a MONAI datalist from a user's download (``dgst-monai data index DIR --dataset ...``).

Supported layouts (the defaults below are also in the dataset cards, ``data_manifests/*.json``):

* ``segrap2023``: ``DIR/segrap_XXXX/image.nii.gz`` with one mask file per structure in the same folder (or in
  ``label_dir/segrap_XXXX/``); the LN target is the nodal label, default file ``GTVnd.nii.gz`` (the name used by
  third-party code for the training release; not verified here - pass ``label_file`` if yours differs).
* ``lnq2023``: NRRD pairs ``<case>-ct.nrrd`` / ``<case>-seg.nrrd`` anywhere under ``DIR`` (``image_glob``,
  ``image_suffix``, ``label_suffix``). Index the fully annotated validation + test scans only.
* ``radcure``: one folder per patient under ``DIR`` holding a DICOM CT series at any depth (the CT series with
  most slices is used; the image entry is that series folder) and an LN mask per patient,
  ``mask_dir/<case>.nii.gz`` (``mask_pattern``; NIfTI, NRRD or MetaImage); or, with ``structures``, the
  patients' own RTSTRUCT / DICOM-SEG files as in the ``dicom`` layout (case id: the patient folder).
* ``lnq2023``: also its DICOM release (CT series + DICOM-SEG) with ``structures``, as the ``dicom`` layout.
* ``dicom``: any folder of DICOM files (any depth, any file names): each RT Structure Set or DICOM-SEG is paired
  with the CT series it references, and the ROIs / segments whose names match ``structures`` (comma-separated,
  case-insensitive globs) are united into the LN label, rasterised once on the CT grid into
  ``<datalist stem>_labels/<case>.nii.gz`` beside the datalist (:mod:`dgst_monai.dicom.labels`). Case ids are
  PatientIDs (``case_id="patient"``) or the folders under ``DIR`` (``case_id="folder"``).
* ``nnunet``: nnU-Net raw layout ``imagesTr/<case>_0000<ending>`` + ``labelsTr/<case><ending>`` (and
  ``imagesTs`` / ``labelsTs`` as the test list when labelled), ``dataset.json`` for the file ending and labels.
  Only channel ``_0000`` is used (the model takes one CT channel).

Paths in the datalist are relative to the datalist's folder (MONAI's ``load_decathlon_datalist`` resolves them)
unless ``absolute=True``. ``intensity_properties`` is nnU-Net's CT fingerprint - HU percentiles 0.5 / 99.5, mean
and std of voxels inside the labels of the training cases - from a seeded sample of at most ``samples_per_case``
foreground voxels per case; ``dgst_monai.data.datalists.ct_normalization`` reads it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from dgst_monai.data.cases import VOLUME_SUFFIXES
from dgst_monai.files import atomic_write_json, read_json
from dgst_monai.normalization import DEFAULT_SAMPLES_PER_CASE, intensity_properties

__all__ = [
    "COMMON_OPTIONS",
    "DATASETS",
    "DEFAULTS",
    "Discovery",
    "FoundCase",
    "discover",
    "index_dataset",
    "intensity_properties",
]

DATASETS: tuple[str, ...] = ("segrap2023", "lnq2023", "radcure", "nnunet", "dicom")

#: Layout options per dataset and their defaults (mirrored in ``data_manifests/<dataset>.json`` ``index.defaults``).
DEFAULTS: dict[str, dict[str, Any]] = {
    "segrap2023": {"case_glob": "segrap_*", "image_file": "image.nii.gz", "label_file": "GTVnd.nii.gz"},
    "lnq2023": {
        "image_glob": "**/*-ct.nrrd", "image_suffix": "-ct.nrrd", "label_suffix": "-seg.nrrd", "structures": None,
    },
    "radcure": {"mask_dir": None, "mask_pattern": "{case}.nii.gz", "structures": None},
    "nnunet": {},
    "dicom": {"structures": None, "case_id": "patient"},
}
#: the layouts that read DICOM-RT labels when ``structures`` is given, and how they name cases
_DICOM_CASE_IDS = {"dicom": None, "radcure": "folder", "lnq2023": "patient"}
#: Options every dataset accepts.
COMMON_OPTIONS = {"label_dir": None}

_LN_LABELS = {"0": "background", "1": "lymph_node"}


@dataclass(frozen=True)
class FoundCase:
    """One case found in a download: absolute image path (file or DICOM folder) and label path."""

    case_id: str
    image: Path
    label: Path
    split: str = "training"


@dataclass
class Discovery:
    """What :func:`discover` found: usable cases, skipped ones with the reason, label names and notes.

    ``dicom_cases`` holds the DICOM-RT cases (``dicom`` layout, or ``structures`` given): their labels are not
    files yet; :func:`index_dataset` rasterises them (:meth:`dgst_monai.dicom.labels.DicomCase.write_label`).
    """

    cases: list[FoundCase] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=lambda: dict(_LN_LABELS))
    notes: list[str] = field(default_factory=list)
    dicom_cases: list[Any] = field(default_factory=list)


def discover(folder: str | os.PathLike[str], dataset: str, **options: Any) -> Discovery:
    """Find the cases of ``dataset`` under ``folder``.

    Args:
        folder: the download's folder (see the module docstring for each layout).
        dataset: one of :data:`DATASETS`.
        **options: layout options of the dataset (:data:`DEFAULTS`) plus ``label_dir``; None keeps the default.

    Raises:
        ValueError: unknown dataset or option, or no case found (the message says what was looked for).
        FileNotFoundError: ``folder`` does not exist.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a folder")
    allowed = {**DEFAULTS[dataset], **COMMON_OPTIONS}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"option(s) {', '.join(unknown)} do not apply to {dataset}; its options: {', '.join(sorted(allowed))}"
        )
    opts = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    if dataset == "dicom" or (dataset in _DICOM_CASE_IDS and opts.get("structures")):
        found = _dicom(root, opts["structures"], _DICOM_CASE_IDS[dataset] or opts["case_id"])
    else:
        found = {"segrap2023": _segrap, "lnq2023": _lnq, "radcure": _radcure, "nnunet": _nnunet}[dataset](root, opts)
    if not found.cases:
        reasons = "; ".join(f"{c}: {r}" for c, r in found.skipped[:5])
        raise ValueError(
            f"no {dataset} case with image and label found under {root} (options {opts})"
            + (f"; skipped: {reasons}" if reasons else "")
        )
    return found


def _segrap(root: Path, opts: dict[str, Any]) -> Discovery:
    out = Discovery()
    label_root = Path(opts["label_dir"]).expanduser().resolve() if opts["label_dir"] else root
    folders = sorted(p for p in root.glob(opts["case_glob"]) if p.is_dir())
    if not folders:
        hint = "point DIR at the folder holding segrap_XXXX/"
        out.skipped.append((str(root), f"no case folder matching {opts['case_glob']!r} ({hint})"))
    for case_dir in folders:
        image = case_dir / opts["image_file"]
        label = label_root / case_dir.name / opts["label_file"]
        if not image.is_file():
            out.skipped.append((case_dir.name, f"no image {image}"))
        elif not label.is_file():
            out.skipped.append((case_dir.name, f"no nodal label {label} (set --label_file / --label_dir)"))
        else:
            out.cases.append(FoundCase(case_dir.name, image, label))
    return out


def _lnq(root: Path, opts: dict[str, Any]) -> Discovery:
    out = Discovery()
    suffix, label_suffix = opts["image_suffix"], opts["label_suffix"]
    label_root = Path(opts["label_dir"]).expanduser().resolve() if opts["label_dir"] else None
    seen: dict[str, Path] = {}
    for image in sorted(root.glob(opts["image_glob"])):
        if not image.is_file() or not image.name.endswith(suffix):
            continue
        case = image.name[: -len(suffix)]
        label = (label_root or image.parent) / f"{case}{label_suffix}"
        if case in seen:
            out.skipped.append((case, f"duplicate case name: {image} and {seen[case]}"))
        elif not label.is_file():
            out.skipped.append((case, f"no segmentation {label}"))
        else:
            seen[case] = image
            out.cases.append(FoundCase(case, image, label))
    if not seen:
        out.skipped.append((str(root), f"no image matching {opts['image_glob']!r} with a {label_suffix!r} partner"))
    return out


def _dicom_ct_series(patient: Path) -> tuple[Path | None, str]:
    """The folder of the CT series with the most files under ``patient`` (any depth), or a reason."""
    best: tuple[int, str, Path] | None = None
    other_modalities: set[str] = set()
    reader = sitk.ImageFileReader()
    for dirpath, _dirs, files in os.walk(patient):
        if not files:
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath):
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, uid)
            reader.SetFileName(names[0])
            try:
                reader.ReadImageInformation()
                modality = reader.GetMetaData("0008|0060").strip() if reader.HasMetaDataKey("0008|0060") else ""
            except RuntimeError:
                continue
            if modality != "CT":
                other_modalities.add(modality or "unknown")
                continue
            candidate = (len(names), dirpath, Path(dirpath))
            if best is None or candidate[:2] > best[:2]:
                best = candidate
    if best is None:
        seen = f" (found modalities {', '.join(sorted(other_modalities))})" if other_modalities else ""
        return None, f"no DICOM CT series under {patient}{seen}"
    return best[2], ""


def _radcure(root: Path, opts: dict[str, Any]) -> Discovery:
    out = Discovery()
    pattern: str = opts["mask_pattern"]
    if "{case}" not in pattern:
        raise ValueError(f"mask_pattern must contain '{{case}}', got {pattern!r}")
    if not pattern.lower().endswith(VOLUME_SUFFIXES):
        raise ValueError(
            f"mask_pattern {pattern!r}: masks must be NIfTI, NRRD or MetaImage files ({', '.join(VOLUME_SUFFIXES)}); "
            "DICOM-SEG and RTSTRUCT masks are not supported - convert them to a label volume on the CT grid first"
        )
    mask_root = Path(opts["mask_dir"] or opts["label_dir"] or root).expanduser().resolve()
    patients = sorted(p for p in root.iterdir() if p.is_dir() and p.resolve() != mask_root)
    for patient in patients:
        series, reason = _dicom_ct_series(patient)
        mask = mask_root / pattern.format(case=patient.name)
        if series is None:
            out.skipped.append((patient.name, reason))
        elif not mask.is_file():
            out.skipped.append((patient.name, f"no LN mask {mask} (set --mask_dir / --mask_pattern)"))
        else:
            out.cases.append(FoundCase(patient.name, series, mask))
    if not patients:
        out.skipped.append((str(root), "no patient folders"))
    return out


def _dicom(root: Path, structures: Any, case_id: str) -> Discovery:
    from dgst_monai.dicom.labels import collect_cases, format_table
    from dgst_monai.dicom.series import DicomError

    out = Discovery()
    cases, out.notes = collect_cases(root, structures, case_id=case_id)
    out.dicom_cases = cases
    for case in cases:
        if case.usable:
            out.cases.append(FoundCase(case.case_id, case.series.folder, Path(f"{case.case_id}.nii.gz")))
        else:
            out.skipped.append((case.case_id, "; ".join(case.problems)))
    if not cases:
        raise DicomError(f"no RT Structure Set or DICOM-SEG under {root}" + "".join(f"; {n}" for n in out.notes[:3]))
    if not out.cases:
        print(format_table(cases), file=sys.stderr)
        raise DicomError(f"no usable DICOM case under {root} (see the table above): " + "; ".join(
            f"{c}: {r}" for c, r in out.skipped[:5]))
    return out


def _nnunet(root: Path, opts: dict[str, Any]) -> Discovery:
    out = Discovery()
    meta_path = root / "dataset.json"
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        meta = read_json(meta_path, "nnU-Net dataset file")
    else:
        out.notes.append(f"no {meta_path}: file ending and labels guessed")
    ending = meta.get("file_ending")
    if ending is None:
        names = [p.name for p in (root / "imagesTr").glob("*_0000.*")]
        ending = next((s for s in VOLUME_SUFFIXES if names and all(n.endswith(s) for n in names)), ".nii.gz")
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) > 1:
        first = channels.get("0", "?")
        out.notes.append(f"dataset.json lists {len(channels)} channels; only channel 0000 ({first}) is used")
    labels = meta.get("labels")
    if isinstance(labels, dict) and labels:
        if all(str(k).isdigit() for k in labels):  # nnU-Net v1: {"0": "background", ...}
            out.labels = {str(k): str(v) for k, v in labels.items()}
        else:  # nnU-Net v2: {"background": 0, ...}; region labels (lists) are not plain label values
            out.labels = {str(v): str(k) for k, v in labels.items() if isinstance(v, int)}
    label_root = Path(opts["label_dir"]).expanduser().resolve() if opts["label_dir"] else root
    for split, img_dir, lab_dir in (("training", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        for image in sorted((root / img_dir).glob(f"*_0000{ending}")):
            case = image.name[: -len(f"_0000{ending}")]
            label = label_root / lab_dir / f"{case}{ending}"
            if label.is_file():
                out.cases.append(FoundCase(case, image, label, split))
            elif split == "training":
                out.skipped.append((case, f"no label {label}"))
            else:
                out.skipped.append((case, f"test image without label {label}: left out (evaluation needs labels)"))
    if not any(c.split == "training" for c in out.cases):
        out.skipped.append((str(root), f"no imagesTr/<case>_0000{ending} with labelsTr/<case>{ending}"))
    return out


def index_dataset(
    folder: str | os.PathLike[str],
    dataset: str,
    output: str | os.PathLike[str],
    absolute: bool = False,
    samples_per_case: int | None = DEFAULT_SAMPLES_PER_CASE,
    seed: int = 0,
    verbose: bool = True,
    **options: Any,
) -> tuple[Path, Discovery]:
    """Find the cases, compute the intensity fingerprint and write the datalist JSON (atomically).

    Args:
        folder: the download's folder.
        dataset: one of :data:`DATASETS`.
        output: datalist path to write.
        absolute: write absolute paths (default: relative to the datalist's folder).
        samples_per_case: foreground voxels sampled per case for ``intensity_properties``.
        seed: sampling seed.
        verbose: print skipped cases and progress to stderr.
        **options: layout options (see :func:`discover`).

    Returns:
        The datalist path and the discovery (cases, skipped cases, notes).
    """
    found = discover(folder, dataset, **options)
    say: Callable[[str], None] | None = (lambda m: print(m, file=sys.stderr)) if verbose else None
    out = Path(output).expanduser()
    out_dir = out.resolve().parent
    label_dir = out_dir / f"{out.stem}_labels"
    staging = _write_dicom_labels(found, out_dir, out.stem) if found.dicom_cases else None
    try:
        datalist = _datalist(found, folder, dataset, out_dir, absolute, samples_per_case, seed, say, options,
                             moved=(staging, label_dir))
        if staging is not None:
            _replace_folder(staging, label_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_json(out, datalist)
    return out, found


def _datalist(
    found: Discovery,
    folder: str | os.PathLike[str],
    dataset: str,
    out_dir: Path,
    absolute: bool,
    samples_per_case: int | None,
    seed: int,
    say: Callable[[str], None] | None,
    options: dict[str, Any],
    moved: tuple[Path | None, Path],
) -> dict[str, Any]:
    if say is not None:
        for case, reason in found.skipped:
            say(f"skipped {case}: {reason}")
        for note in found.notes:
            say(f"note: {note}")
    staging, label_dir = moved

    def where(path: Path) -> str:
        if staging is not None and path.parent == staging:
            path = label_dir / path.name  # where the label will be once the staging folder is moved into place
        return str(path) if absolute else os.path.relpath(path, out_dir)

    lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for case in found.cases:
        lists[case.split].append({"case_id": case.case_id, "image": where(case.image), "label": where(case.label)})
    training = [c for c in found.cases if c.split == "training"]
    props = intensity_properties(training, samples_per_case=samples_per_case, seed=seed, progress=say)
    if props is None and say is not None:
        say("warning: no labelled voxel in any training case: intensity_properties is null")
    datalist: dict[str, Any] = {
        "name": dataset,
        "dataset": dataset,
        "description": f"{dataset} cases indexed from {Path(folder).expanduser().resolve()} by `dgst-monai data index`",
        "root": str(Path(folder).expanduser().resolve()),
        "paths": "absolute" if absolute else "relative to this file's folder",
        "index_options": {**DEFAULTS[dataset], **{k: v for k, v in options.items() if v is not None}},
        "labels": found.labels,
        "modality": {"0": "CT"},
        "intensity_properties": props,
        "intensity_sampling": {"samples_per_case": samples_per_case, "seed": seed, "cases": len(training),
                               "over": "voxels with label > 0 in the training cases"},
        "skipped": [{"case": c, "reason": r} for c, r in found.skipped],
        **({"dicom": _dicom_rows(found)} if found.dicom_cases else {}),
        "numTraining": len(lists["training"]),
        "numTest": len(lists["test"]),
        "training": lists["training"],
        "test": lists["test"],
    }
    return datalist


def _write_dicom_labels(found: Discovery, out_dir: Path, stem: str) -> Path:
    """Rasterise the DICOM-RT cases' labels into a new staging folder beside the datalist; cases whose
    contours cannot be placed move to ``found.skipped``. Prints the table of every series and label object."""
    from dgst_monai.dicom.labels import format_table
    from dgst_monai.dicom.series import DicomError

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}_labels.", dir=out_dir))
    status: dict[str, str] = {}
    try:
        by_id = {c.case_id: c for c in found.dicom_cases if c.usable}
        kept = []
        for case in found.cases:
            path = staging / case.label.name
            problems = by_id[case.case_id].write_label(path)
            if problems:
                found.skipped.append((case.case_id, "; ".join(problems)))
                status[case.case_id] = "skipped: " + "; ".join(problems)
            else:
                kept.append(FoundCase(case.case_id, case.image, path, case.split))
                status[case.case_id] = f"used: label {case.label.name}"
        found.cases = kept
        print(format_table(found.dicom_cases, lambda c: status.get(c.case_id) if c.usable else None), file=sys.stderr)
        if not kept:
            raise DicomError("no DICOM case left with a usable lymph-node label; see the table above")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _dicom_rows(found: Discovery) -> list[dict[str, Any]]:
    """The table of DICOM series and label objects, as the datalist records it."""
    rows = []
    for case in found.dicom_cases:
        used = any(c.case_id == case.case_id for c in found.cases) and case.usable
        reasons = [r for c, r in found.skipped if c == case.case_id]
        for source in case.sources:
            rows.append({
                "case": case.case_id,
                "series": None if case.series is None else case.series.uid,
                "series_folder": None if case.series is None else str(case.series.folder),
                "object": source.obj.kind,
                "file": str(source.obj.path),
                "names": list(source.names.values()),
                "matched": list(source.matched.values()),
                "status": "used" if used else "skipped: " + "; ".join(reasons),
            })
    return rows


def _replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is replaced only once ``new`` is complete."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
