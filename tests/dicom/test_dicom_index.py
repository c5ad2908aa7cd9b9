"""``dgst-monai data index DIR dicom --structures ...``: a hospital's DICOM folder becomes a datalist.

The clinic folder holds, in several transfer syntaxes and files without ``.dcm`` endings: an RT Structure Set as
a planning system exports it (mixed-case ROI names, a hole, two contours on one slice, decoys), a FRACTIONAL
DICOM-SEG and a LABELMAP DICOM-SEG written with highdicom (decoy segments), and one case for every way a case can
fail: a structure set whose series is missing, a tilted series, no matching ROI, contours outside the CT, two
series claiming one case. The expected labels are computed independently (matplotlib's point-in-polygon for
contours, the arrays handed to highdicom for SEGs).
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import circle, contour_item, phantom, write_ct, write_rtstruct
from matplotlib.path import Path as PolygonPath
from pydicom.sr.codedict import codes

from dgst_monai.cli import main

SPACING, ORIGIN = (0.8, 0.9, 2.0), (-20.0, -30.0, -100.0)
SHAPE = (12, 48, 40)  # slices, rows, columns
STRUCTURES = "LN*,*node*"


def z_of(k: int) -> float:
    return ORIGIN[2] + SPACING[2] * k


def centres() -> np.ndarray:
    """World (x, y) of every voxel centre of a slice, (rows * columns, 2)."""
    rows, cols = np.indices(SHAPE[1:])
    return np.column_stack([ORIGIN[0] + SPACING[0] * cols.ravel(), ORIGIN[1] + SPACING[1] * rows.ravel()])


def expected_from_contours(per_slice: dict[int, list[np.ndarray]]) -> np.ndarray:
    """Even-odd union of polygons per slice, by matplotlib's point-in-polygon test."""
    out = np.zeros(SHAPE, dtype=bool)
    for k, polygons in per_slice.items():
        inside = np.zeros(SHAPE[1] * SHAPE[2], dtype=bool)
        for poly in polygons:
            inside ^= PolygonPath(poly).contains_points(centres())
        out[k] |= inside.reshape(SHAPE[1:])
    return out


def rtstruct_case(folder: Path, patient: str, rois: dict[str, dict[int, list[np.ndarray]]], **ct) -> dict[str, str]:
    hu, _ = phantom(SHAPE)
    uids = write_ct(folder / "CT", hu, spacing=SPACING, origin=ORIGIN, patient_id=patient, **ct)
    items = {name: [contour_item(p, z_of(k)) for k, polys in contours.items() for p in polys]
             for name, contours in rois.items()}
    write_rtstruct(folder / "RS" / "RS1", items, series_uid=uids["series"], study_uid=uids["study"],
                   frame_uid=uids["frame"], patient_id=patient)
    return uids


def seg_case(folder: Path, patient: str, segments: list[tuple[str, np.ndarray]], kind: str, syntax: str) -> None:
    hu, _ = phantom(SHAPE)
    write_ct(folder / "CT", hu, spacing=SPACING, origin=ORIGIN, patient_id=patient, syntax=syntax)
    sources = sorted((pydicom.dcmread(p) for p in (folder / "CT").iterdir()), key=lambda d: d.ImagePositionPatient[2])
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=label, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=hd.sr.CodedConcept("59441001", "SCT", "Lymph node"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, (label, _) in enumerate(segments, start=1)
    ]
    if kind == "LABELMAP":
        pixels = np.zeros(SHAPE, dtype=np.uint8)
        for n, (_, mask) in enumerate(segments, start=1):
            pixels[mask] = n
    else:
        pixels = np.stack([m for _, m in segments], axis=-1).astype(np.float32)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="other tool", manufacturer_model_name="other", software_versions="1", device_serial_number="1",
        **({"max_fractional_value": 200} if kind == "FRACTIONAL" else {}),
    )
    (folder / "SEG").mkdir(parents=True)
    seg.save_as(folder / "SEG" / "seg_export")


def blob(z: float, y: float, x: float, r: float) -> np.ndarray:
    k, j, i = np.indices(SHAPE)
    return ((k - z) * 2.0) ** 2 + ((j - y) * 0.9) ** 2 + ((i - x) * 0.8) ** 2 < r**2


@pytest.fixture(scope="module")
def clinic(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("clinic")
    expected: dict[str, np.ndarray] = {}
    # P001: a planning system's structure set (JPEG 2000 CT)
    level2 = {4: [circle(-8.1, -12.2, 4.13, 360)],
              5: [circle(-8.1, -12.2, 4.13, 360), circle(-8.1, -12.2, 1.71, 360), circle(4.2, 0.3, 2.33, 360)],
              6: [circle(-8.1, -12.2, 3.07, 360)]}
    level3 = {7: [circle(-2.3, 8.1, 3.31, 360)]}
    decoy = {k: [circle(0.2, -5.1, 8.03, 360)] for k in range(2, 10)}
    rtstruct_case(root / "P001", "P001", {"LN_Level2": level2, "ln level 3 R": level3, "Parotid_L": decoy},
                  syntax="jpeg2000")
    expected["P001"] = expected_from_contours(level2) | expected_from_contours(level3)
    # P002: a FRACTIONAL SEG with a decoy segment between two node segments (RLE CT)
    a, b, cord = blob(4, 15, 12, 3.5), blob(8, 32, 26, 3.1), blob(6, 24, 20, 5.0)
    seg_case(root / "P002", "P002", [("Lymph node A", a), ("Spinal cord", cord), ("lymph NODE b", b)],
             "FRACTIONAL", "rle")
    expected["P002"] = a | b
    # P003: a LABELMAP SEG (JPEG-LS CT)
    node, stem = blob(5, 20, 10, 3.3), blob(7, 30, 28, 4.0)
    seg_case(root / "P003", "P003", [("LN", node), ("Brainstem", stem)], "LABELMAP", "jpegls")
    expected["P003"] = node
    # what goes wrong in real folders
    rtstruct_case(root / "P004", "P004", {"LN_1": level3})
    for f in (root / "P004" / "CT").iterdir():
        f.unlink()  # the series was not exported with its structure set
    rtstruct_case(root / "P005", "P005", {"LN_1": level3}, tilt_mm=0.6)
    rtstruct_case(root / "P006", "P006", {"Parotid_R": decoy, "Brainstem": level3})
    rtstruct_case(root / "P007", "P007", {"LN_far": {7: [circle(80.0, 8.1, 3.31, 36)]}})
    rtstruct_case(root / "P008a", "P008", {"LN_1": level3})
    rtstruct_case(root / "P008b", "P008", {"LN_2": level2})
    return root, expected


def test_index_pairs_structure_sets_and_segmentations_with_their_series(clinic, tmp_path, capsys):
    root, expected = clinic
    out = tmp_path / "lists" / "datalist.json"
    main(["data", "index", str(root), "dicom", "--structures", STRUCTURES, "--output", str(out)])
    datalist = json.loads(out.read_text())
    cases = {c["case_id"]: c for c in datalist["training"]}
    assert sorted(cases) == ["P001", "P002", "P003"]
    for case_id, case in cases.items():
        assert (out.parent / case["image"]).resolve() == (root / case_id / "CT").resolve()
        assert case["label"] == f"datalist_labels/{case_id}.nii.gz"
        label = sitk.ReadImage(str(out.parent / case["label"]))
        image = sitk.ReadImage(sorted(str(p) for p in (root / case_id / "CT").iterdir())[0])
        assert label.GetSpacing() == pytest.approx(SPACING) and label.GetOrigin() == pytest.approx(ORIGIN)
        assert image.GetOrigin()[:2] == pytest.approx(ORIGIN[:2])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label).astype(bool), expected[case_id], err_msg=case_id)
    skipped = {s["case"]: s["reason"] for s in datalist["skipped"]}
    assert "not under the indexed folder" in skipped["P004"] and str(root / "P004" / "RS" / "RS1") in skipped["P004"]
    assert "gantry-tilted" in skipped["P005"]
    assert "no ROI / segment matches --structures 'LN*,*node*' (found: Brainstem, Parotid_R)" in skipped["P006"]
    assert "contour outside the CT" in skipped["P007"] and "LN_far" in skipped["P007"]
    assert "2 series claim case P008" in skipped["P008"]
    assert datalist["intensity_properties"]["percentile_00_5"] < datalist["intensity_properties"]["percentile_99_5"]
    rows = {(r["case"], r["object"]): r for r in datalist["dicom"]}
    assert rows[("P001", "RTSTRUCT")]["names"] == ["LN_Level2", "ln level 3 R", "Parotid_L"]
    assert rows[("P001", "RTSTRUCT")]["matched"] == ["LN_Level2", "ln level 3 R"]
    assert rows[("P002", "SEG")]["matched"] == ["Lymph node A", "lymph NODE b"]
    table = capsys.readouterr().err
    assert "Parotid_L" in table and "used: label P001.nii.gz" in table and "gantry-tilted" in table
    # the datalist passes the data check, as every other layout's does
    main(["data", "check", str(out)])
    assert "3 cases checked, no problems found" in capsys.readouterr().out


def test_radcure_layout_reads_the_structure_sets_with_patient_folders_as_cases(clinic, tmp_path):
    root, expected = clinic
    out = tmp_path / "radcure.json"
    main(["data", "index", str(root), "--dataset", "radcure", "--structures", "ln*", "--output", str(out)])
    cases = {c["case_id"] for c in json.loads(out.read_text())["training"]}
    assert cases == {"P001", "P003", "P008a", "P008b"}  # folder names: P008's two series are two cases here


def test_nothing_half_written_when_no_case_is_usable(clinic, tmp_path):
    root, _ = clinic
    out = tmp_path / "datalist.json"
    with pytest.raises(SystemExit):
        main(["data", "index", str(root / "P006"), "dicom", "--structures", STRUCTURES, "--output", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_a_reindex_replaces_the_labels_and_structures_are_required(clinic, tmp_path):
    root, _ = clinic
    out = tmp_path / "datalist.json"
    main(["data", "index", str(root / "P003"), "dicom", "--structures", "ln", "--output", str(out)])
    stale = tmp_path / "datalist_labels" / "stale.nii.gz"
    stale.write_bytes(b"")
    main(["data", "index", str(root / "P001"), "dicom", "--structures", "ln_*", "--output", str(out)])
    assert sorted(p.name for p in (tmp_path / "datalist_labels").iterdir()) == ["P001.nii.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datalist.json", "datalist_labels"]
    with pytest.raises(SystemExit):
        main(["data", "index", str(root / "P001"), "dicom", "--output", str(out)])
