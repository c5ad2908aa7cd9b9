"""Real DICOM files for the clinical DICOM tests: CT series in several transfer syntaxes, RT structure sets drawn
by hand (holes, several contours per slice, mixed-case names), and the ``dciodvfy`` validator.

Arrays here are (slices, rows, columns), the DICOM order; geometry is LPS.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
}


def phantom(shape: tuple[int, int, int] = (12, 48, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A HU volume (slices, rows, columns) with a body and two node-sized blobs, and their mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    body = ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    hu = np.where(body, 40, -1000) + rng.normal(0, 8, shape)
    nodes = ((z - 5) * 2.0) ** 2 + (y - 18) ** 2 + (x - 14) ** 2 < 36
    nodes |= ((z - 7) * 2.0) ** 2 + (y - 30) ** 2 + (x - 26) ** 2 < 30
    hu[nodes] = 25
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), nodes.astype(np.uint8)


def write_ct(
    folder: Path,
    hu: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (0.8, 0.9, 2.0),
    origin: tuple[float, float, float] = (-20.0, -30.0, -100.0),
    syntax: str = "explicit",
    tilt_mm: float = 0.0,
    positions: Sequence[float] | None = None,
    patient_id: str = "P001",
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    empty_uids: bool = False,
    suffix: str = "",
) -> dict[str, str]:
    """Write a CT series, one file per slice, named without ``.dcm`` unless ``suffix`` says so.

    Args:
        hu: (slices, rows, columns) int16 HU.
        spacing: (column spacing, row spacing, slice distance) mm.
        tilt_mm: shift of each slice along y per slice (a gantry-tilted series).
        positions: slice positions along z (default: regular).
        empty_uids: write the data sets with empty SOP Instance / Series / Study UIDs, as anonymisers leave
            them (the file meta keeps the instance UID).

    Returns:
        The series', study's and frame of reference's UIDs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    uids = {
        "series": series_uid or generate_uid(),
        "study": study_uid or generate_uid(),
        "frame": frame_uid or generate_uid(),
    }
    zs = positions if positions is not None else [origin[2] + k * spacing[2] for k in range(hu.shape[0])]
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)
    for k in range(hu.shape[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "" if empty_uids else CT_STORAGE
        ds.SOPInstanceUID = "" if empty_uids else ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", patient_id, "", "O"
        ds.StudyInstanceUID = "" if empty_uids else uids["study"]
        ds.SeriesInstanceUID = "" if empty_uids else uids["series"]
        ds.FrameOfReferenceUID = uids["frame"]
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 3, k + 1
        ds.Manufacturer = "test"
        ds.ImagePositionPatient = [origin[0], origin[1] + tilt_mm * k, zs[k]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = stored[k].tobytes()
        if syntax != "explicit":
            if syntax == "implicit":
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            else:
                ds.compress(SYNTAXES[syntax])
        ds.save_as(folder / f"IM{k:04d}{suffix}", enforce_file_format=True)
    return uids


def contour_item(points_xy: np.ndarray, z: float) -> Dataset:
    """One CLOSED_PLANAR contour from (n, 2) LPS x, y points at height z."""
    item = Dataset()
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points_xy)
    item.ContourData = [f"{v:.3f}" for v in np.column_stack([points_xy, np.full(len(points_xy), z)]).ravel()]
    return item


def circle(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])


def write_rtstruct(
    path: Path,
    rois: dict[str, list[Dataset]],
    *,
    series_uid: str,
    study_uid: str,
    frame_uid: str,
    patient_id: str = "P001",
) -> Path:
    """A minimal RT Structure Set as a planning system exports one: named ROIs with the given contours."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = "Test^Patient", patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.StructureSetLabel = "TPS"
    ds.StructureSetDate = datetime.date.today().strftime("%Y%m%d")
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", study_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    structure, contours = [], []
    for number, (name, items) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame_uid
        roi.ROIGenerationAlgorithm = "MANUAL"
        structure.append(roi)
        contour = Dataset()
        contour.ReferencedROINumber = number
        contour.ContourSequence = DicomSequence(items)
        contours.append(contour)
    ds.StructureSetROISequence = DicomSequence(structure)
    ds.ROIContourSequence = DicomSequence(contours)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines ``dciodvfy`` reports for a DICOM file (the test fails when dciodvfy is missing)."""
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it"
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def read_dataset(path: Path) -> Dataset:
    return pydicom.dcmread(path)
