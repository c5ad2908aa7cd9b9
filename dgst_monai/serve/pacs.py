"""MONAI Label's datastore over a DICOMweb PACS (Orthanc, dcm4chee, ...): the clinic's loop without copies by hand.

``dgst-monai serve --studies http://host:port/dicom-web --structures 'LN*'`` serves the PACS's CT series as
studies (the image id is the SeriesInstanceUID). :class:`PacsDatastore`:

* downloads a series once (WADO-RS) into the app's cache and hands the bundle the DICOM folder;
* stores every inference back into the PACS as a new DICOM-SEG (or RTSTRUCT) series of the same study, referencing
  the series (STOW-RS, :meth:`PacsDatastore.store_result`); nothing else in the PACS is ever written;
* counts as labelled every CT series that an RT Structure Set or DICOM-SEG in the PACS contours with ROIs /
  segments matching ``--structures`` (the department's prior contours become the shots of a DGST fine-tune), plus
  the labels submitted through MONAI Label's label API; our own automatic results never count;
* keeps submitted labels in the cache (the PACS is not written for them).

Series that do not exist in the PACS have no URI (the server answers 404); a damaged instance makes the study
unreadable (422 naming the instance), never a zero-filled volume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from dgst_monai.dicom.labels import collect_cases, parse_structures
from dgst_monai.dicom.writers import DICOM_FORMATS, mask_to_dicom
from dgst_monai.files import atomic_write_json

__all__ = ["OUR_MANUFACTURER", "PacsDatastore"]

logger = logging.getLogger(__name__)

#: what our written objects carry as Manufacturer: they are results, never labels
OUR_MANUFACTURER = "dgst-monai"
_UID = "0020000E"  # SeriesInstanceUID in DICOM JSON
_STUDY = "0020000D"


def _value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value", [])
    return str(values[0]) if values else ""


def _is_ours(ds: pydicom.Dataset) -> bool:
    """An automatic result of ours (SEG or RTSTRUCT), which must not become a training label."""
    if str(ds.get("Manufacturer", "")) != OUR_MANUFACTURER:
        return False
    automatic = [str(s.get("SegmentAlgorithmType", "")) for s in ds.get("SegmentSequence", [])]
    automatic += [str(r.get("ROIGenerationAlgorithm", "")) for r in ds.get("StructureSetROISequence", [])]
    return all(a == "AUTOMATIC" for a in automatic)


class PacsDatastore(Datastore):
    """CT series of a DICOMweb PACS as MONAI Label studies; prior RTSTRUCT / SEG contours as labels.

    Args:
        url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        cache: folder for downloaded series, rasterised prior labels and submitted labels.
        structures: globs on ROI / segment names that make a prior contour a lymph-node label (none: only
            submitted labels count).
        store_format: ``dicom-seg`` or ``rtstruct``: what an inference is stored back as by default.

    Example::

        store = PacsDatastore("http://127.0.0.1:8042/dicom-web", "app/pacs", structures="LN*")
        store.list_images()          # CT SeriesInstanceUIDs
        store.datalist()             # [{"image": <series folder>, "label": <label file>, "study": ..., ...}]
    """

    def __init__(
        self,
        url: str,
        cache: str | os.PathLike[str],
        structures: str | Sequence[str] | None = None,
        store_format: str = "dicom-seg",
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        if store_format not in DICOM_FORMATS:
            raise ValueError(f"store_format must be one of {', '.join(DICOM_FORMATS)}, got {store_format!r}")
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(url=self.url)
        self.cache = Path(cache).expanduser().resolve()
        self.structures = parse_structures(structures) if structures else ()
        self.store_format = store_format
        self._name, self._description = "PACS", f"DICOMweb {self.url}"
        self._lock = threading.RLock()
        self._priors: dict[str, dict[str, Any]] | None = None
        for folder in ("dicom/series", "dicom/objects", "results", "incoming"):
            (self.cache / folder).mkdir(parents=True, exist_ok=True)

    # -- the PACS ---------------------------------------------------------------------------------------------
    def _series(self, modality: str) -> list[dict[str, Any]]:
        return self.client.search_for_series(search_filters={"Modality": modality}) or []

    def _study_of(self, series_uid: str) -> str:
        found = self.client.search_for_series(search_filters={"SeriesInstanceUID": series_uid}) or []
        return _value(found[0], _STUDY) if found else ""

    def _download(self, study: str, series: str, folder: Path) -> Path:
        """Every instance of a series into ``folder`` (named by SOP Instance UID), written whole or not at all."""
        with self._lock:
            if folder.is_dir() and any(folder.iterdir()):
                return folder
            partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
            try:
                for ds in self.client.retrieve_series(study, series):
                    uid = str(ds.get("SOPInstanceUID", "") or ds.file_meta.MediaStorageSOPInstanceUID)
                    ds.save_as(partial / f"{uid}.dcm", enforce_file_format=True)
                os.replace(partial, folder)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return folder

    def list_images(self) -> list[str]:
        """The SeriesInstanceUIDs of the PACS's CT series."""
        return sorted({_value(s, _UID) for s in self._series("CT")} - {""})

    def get_image_uri(self, image_id: str) -> str:
        """The cached DICOM folder of CT series ``image_id`` (downloaded on first use); ``""`` when the PACS has no
        such CT series."""
        folder = self.cache / "dicom" / "series" / image_id
        if image_id and folder.is_dir() and any(folder.iterdir()):
            return str(folder)  # downloaded whole before (a series in a PACS does not change)
        if not image_id or image_id not in self.list_images():
            return ""
        return str(self._download(self._study_of(image_id), image_id, folder))

    def get_image(self, image_id: str, params: Any = None) -> Any:
        uri = self.get_image_uri(image_id)
        return open(uri, "rb") if os.path.isfile(uri) else uri

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        return {"SeriesInstanceUID": image_id, "StudyInstanceUID": self._study_of(image_id), "source": self.url}

    def store_result(self, image_id: str, mask: str | os.PathLike[str], store_format: str | None = None) -> dict[str, str]:
        """Write ``mask`` (on the series' grid) as DICOM-SEG or RTSTRUCT of ``image_id`` and store it in the PACS.

        Returns:
            ``format``, the new ``SeriesInstanceUID`` and ``StudyInstanceUID``.
        """
        fmt = store_format or self.store_format
        if fmt not in DICOM_FORMATS:
            raise ValueError(f"store format must be one of {', '.join(DICOM_FORMATS)}, got {fmt!r}")
        folder = self.get_image_uri(image_id)
        with tempfile.TemporaryDirectory(prefix="result-") as out:
            written = mask_to_dicom(mask, folder, out, (fmt,), stem="result").files[fmt]
            ds = pydicom.dcmread(written)
            self.client.store_instances([ds])
        return {"format": fmt, "SeriesInstanceUID": str(ds.SeriesInstanceUID), "StudyInstanceUID": str(ds.StudyInstanceUID)}

    # -- labels -----------------------------------------------------------------------------------------------
    def _fetch_label_objects(self) -> bool:
        """Download the PACS's RTSTRUCT and SEG series not seen yet: ours (results) aside, the others beside the
        CT series they reference. Whether a new label object (not ours) arrived."""
        images = set(self.list_images())
        arrived = False
        for modality in ("RTSTRUCT", "SEG"):
            for item in self._series(modality):
                study, series = _value(item, _STUDY), _value(item, _UID)
                if (self.cache / "results" / series).exists() or (self.cache / "dicom" / "objects" / series).exists():
                    continue
                folder = self._download(study, series, self.cache / "incoming" / series)
                headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in sorted(folder.iterdir())]
                ours = all(_is_ours(ds) for ds in headers)
                os.replace(folder, self.cache / ("results" if ours else "dicom/objects") / series)
                if not ours:
                    arrived = True
                    for ref in set().union(*(_referenced_series(ds) for ds in headers)) & images:
                        self.get_image_uri(ref)
        return arrived

    def _prior_labels(self) -> dict[str, dict[str, Any]]:
        """CT series uid -> {label, study, objects, structures} for the PACS's matching prior contours."""
        if not self.structures:
            return {}
        with self._lock:
            if not self._fetch_label_objects() and self._priors is not None:
                return self._priors  # no new contour in the PACS since the last look
            cases, _ = collect_cases(self.cache / "dicom", self.structures)
            self._priors = self._rasterise(cases)
            return self._priors

    def _rasterise(self, cases: list[Any]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for case in cases:
            if not case.usable:
                logger.info(f"prior contours of {case.case_id} not used: {'; '.join(case.problems)}")
                continue
            target = self.cache / "labels" / "prior" / f"{case.series.uid}.nii.gz"
            sources = sorted(s.obj.path.parent.name for s in case.sources if s.matched)
            stamp = self.cache / "labels" / "prior" / f"{case.series.uid}.json"
            if not (target.is_file() and stamp.is_file() and json.loads(stamp.read_text())["objects"] == sources):
                problems = case.write_label(target)
                if problems:
                    logger.info(f"prior contours of {case.case_id} not used: {'; '.join(problems)}")
                    continue
                atomic_write_json(stamp, {"objects": sources})
            found[case.series.uid] = {
                "label": str(target),
                "study": case.series.study_uid,
                "objects": sources,
                "structures": sorted({n for s in case.sources for n in s.matched.values()}),
            }
        return found

    def _submitted(self, tag: str = DefaultLabelTag.FINAL.value) -> dict[str, Path]:
        folder = self.cache / "labels" / tag
        return {p.name[: -len(".nii.gz")]: p for p in folder.glob("*.nii.gz")} if folder.is_dir() else {}

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """The labelled CT series: a submitted label where there is one, else the prior contours' label.

        Each entry names its ``study``, its ``source`` (``submitted`` or the RTSTRUCT / SEG series) and the
        ``structures`` used.
        """
        entries = {}
        for uid, prior in self._prior_labels().items():
            entries[uid] = {"image": self.get_image_uri(uid), "label": prior["label"], "study": prior["study"],
                            "source": prior["objects"], "structures": prior["structures"]}
        images = set(self.list_images())
        for uid, path in self._submitted().items():
            if uid in images:
                entries[uid] = {"image": self.get_image_uri(uid), "label": str(path), "study": self._study_of(uid),
                                "source": "submitted", "structures": []}
        return [entries[uid] for uid in sorted(entries)]

    def get_labeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        return sorted(Path(e["image"]).name for e in self.datalist())

    def get_unlabeled_images(self, label_tag: str | None = None, labels: Sequence[str] | None = None) -> list[str]:
        return sorted(set(self.list_images()) - set(self.get_labeled_images()))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Keep a submitted label (a volume file on the series' grid; the route converts a DICOM-SEG to one)."""
        target = self.cache / "labels" / label_tag / f"{image_id}.nii.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(label_filename, target)
        atomic_write_json(target.with_suffix(".json"), {"info": label_info})
        return image_id

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        path = self.cache / "labels" / label_tag / f"{label_id}.nii.gz"
        return str(path) if path.is_file() else ""

    def get_label(self, label_id: str, label_tag: str, params: Any = None) -> Any:
        uri = self.get_label_uri(label_id, label_tag)
        return open(uri, "rb") if uri else None

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        return {tag: image_id for tag in (DefaultLabelTag.FINAL.value, DefaultLabelTag.ORIGINAL.value)
                if self.get_label_uri(image_id, tag)}

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return image_id if self.get_label_uri(image_id, tag) else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        path = self.cache / "labels" / label_tag / f"{label_id}.json"
        return json.loads(path.read_text())["info"] if path.is_file() else {}

    def remove_label(self, label_id: str, label_tag: str) -> None:
        for suffix in (".nii.gz", ".json"):
            (self.cache / "labels" / label_tag / f"{label_id}{suffix}").unlink(missing_ok=True)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        path = self.cache / "labels" / label_tag / f"{label_id}.json"
        atomic_write_json(path, {"info": {**self.get_label_info(label_id, label_tag), **info}})

    # -- what a PACS does not allow here ------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise ValueError("the PACS datastore is read-only: store new series in the PACS itself")

    def remove_image(self, image_id: str) -> None:
        raise ValueError("the PACS datastore never deletes from the PACS")

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        return None

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        raise ValueError("no dataset archive of a PACS: export from the PACS itself")

    def refresh(self) -> None:
        return None

    def name(self) -> str:
        return self._name

    def set_name(self, name: str) -> None:
        self._name = name

    def description(self) -> str:
        return self._description

    def set_description(self, description: str) -> None:
        self._description = description

    def status(self) -> dict[str, Any]:
        """Counts for ``/info/`` (asked often, so from what is known: the labelled count is the last one computed)."""
        labelled = set(self._priors or {}) | set(self._submitted())
        return {"total": len(self.list_images()), "completed": len(labelled),
                "label_tags": [DefaultLabelTag.FINAL.value], "source": self.url, "structures": list(self.structures)}

    def json(self) -> dict[str, Any]:
        """``GET /datastore/?output=all``: every CT series, and for the labelled ones where the label comes from."""
        labelled = {Path(e["image"]).name: e for e in self.datalist()}
        objects = {}
        for uid in self.list_images():
            entry: dict[str, Any] = {"image": {"info": {"source": self.url}}, "labels": {}}
            if uid in labelled:
                e = labelled[uid]
                entry["labels"][DefaultLabelTag.FINAL.value] = {
                    "info": {"study": e["study"], "source": e["source"], "structures": e["structures"]}
                }
            objects[uid] = entry
        return {"name": self._name, "description": self._description, "objects": objects}


def _referenced_series(ds: pydicom.Dataset) -> set[str]:
    found = {str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence", [])}
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref.get("RTReferencedStudySequence", []):
            found |= {str(s.get("SeriesInstanceUID", "")) for s in study.get("RTReferencedSeriesSequence", [])}
    return found - {""}
