"""A mask back into the clinic: ``data to-dicom``, ``predict --format`` and the bundles' ``output_format``.

Every object written is checked with ``dciodvfy`` (no error), read back with highdicom (SEG, exactly), with
DicomRTTool (an independent RTSTRUCT reader, Dice >= 0.95) and with our own reader (exactly), and its references
are compared with the source series.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from bundle_support import BUNDLES, save_tiny_checkpoint
from dicom_helpers import dciodvfy_errors, phantom, write_ct

from dgst_monai.cli import main
from dgst_monai.data.readers import read_image
from dgst_monai.dicom.rtstruct import rasterise_rois
from dgst_monai.dicom.series import LabelObject, scan
from dgst_monai.predict import output_paths

SPACING, ORIGIN = (0.8, 0.9, 2.0), (-20.0, -30.0, -100.0)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[Path, np.ndarray, dict[str, str]]:
    """A CT series (JPEG 2000) and a node mask (slices, rows, columns) saved as NIfTI on its grid."""
    root = tmp_path_factory.mktemp("series")
    hu, nodes = phantom()
    uids = write_ct(root / "CT", hu, spacing=SPACING, origin=ORIGIN, syntax="jpeg2000", patient_id="PAT-7")
    mask = sitk.GetImageFromArray(nodes)
    mask.CopyInformation(read_image(root / "CT"))
    sitk.WriteImage(mask, str(root / "case7.nii.gz"))
    return root, nodes.astype(bool), uids


def dicomrttool_mask(folder: Path, roi: str) -> np.ndarray:
    """The ROI as DicomRTTool rasterises it, (slices, rows, columns)."""
    from DicomRTTool.ReaderWriter import DicomReaderWriter

    reader = DicomReaderWriter(description="check", Contour_Names=[roi.lower()], arg_max=True, verbose=False)
    reader.walk_through_folders(str(folder))
    reader.get_images_and_mask()
    return np.asarray(reader.mask).astype(bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_to_dicom_writes_conformant_seg_and_rtstruct_that_read_back_as_the_mask(series, tmp_path, capsys):
    root, nodes, uids = series
    out = tmp_path / "out"
    main(["data", "to-dicom", str(root / "case7.nii.gz"), "--series", str(root / "CT"),
          "--format", "rtstruct,dicom-seg", "--output", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["case7_rtstruct.dcm", "case7_seg.dcm"]
    for path in out.iterdir():
        assert dciodvfy_errors(path) == [], path.name
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == uids["study"] and ds.FrameOfReferenceUID == uids["frame"]
        assert ds.SeriesInstanceUID not in (uids["series"], "") and ds.PatientID == "PAT-7"
    sources = {pydicom.dcmread(p).SOPInstanceUID for p in (root / "CT").iterdir()}
    # SEG: highdicom reads it back exactly; it references every source slice
    seg = hd.seg.segread(out / "case7_seg.dcm")
    assert seg.get_segment_description(1).segmented_property_type.value == "59441001"
    assert seg.get_segment_description(1).SegmentAlgorithmType == "AUTOMATIC"
    volume = seg.get_volume(combine_segments=True)
    z = volume.affine[2, 3] + np.arange(volume.spatial_shape[0]) * volume.affine[2, 0]
    np.testing.assert_array_equal(volume.array[np.argsort(z)].astype(bool), nodes)
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == uids["series"]
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == sources
    # RTSTRUCT: DicomRTTool (independent) and our reader
    rs = pydicom.dcmread(out / "case7_rtstruct.dcm")
    study = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    referenced = study.RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == uids["series"]
    assert {i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence} == sources
    assert rs.StructureSetROISequence[0].ROIName == "Lymph nodes"
    assert rs.RTROIObservationsSequence[0].RTROIInterpretedType == "ORGAN"
    check = tmp_path / "check"
    check.mkdir()
    for p in (root / "CT").iterdir():
        (check / p.name).write_bytes(p.read_bytes())
    (check / "rs.dcm").write_bytes((out / "case7_rtstruct.dcm").read_bytes())
    assert dice(dicomrttool_mask(check, "Lymph nodes"), nodes) >= 0.95
    ct = next(iter(scan(check).series.values()))
    ours, problems = rasterise_rois(LabelObject(check / "rs.dcm", rs, "RTSTRUCT"), [1], ct.grid)
    assert problems == [] and np.array_equal(ours.astype(bool), nodes)


def test_split_nodes_holes_and_an_empty_mask(series, tmp_path, capsys):
    root, nodes, _ = series
    ringed = nodes.copy()
    ringed[5, 40:47, 2:9] = True
    ringed[5, 42:45, 4:7] = False  # a ring with a hole...
    ringed[5, 43, 5] = True  # ...and an island in it
    image = sitk.GetImageFromArray(ringed.astype(np.uint8))
    image.CopyInformation(read_image(root / "CT"))
    sitk.WriteImage(image, str(tmp_path / "ringed.nii.gz"))
    main(["data", "to-dicom", str(tmp_path / "ringed.nii.gz"), "--series", str(root / "CT"), "--format", "rtstruct",
          "--split_nodes", "--output", str(tmp_path / "split")])
    path = tmp_path / "split" / "ringed_rtstruct.dcm"
    assert dciodvfy_errors(path) == []
    rs = pydicom.dcmread(path)
    # two nodes, the ring, and the island inside its hole (not connected to the ring)
    assert [r.ROIName for r in rs.StructureSetROISequence] == [f"Lymph nodes {i}" for i in range(1, 5)]
    ct = next(iter(scan(root / "CT").series.values()))
    union, _ = rasterise_rois(LabelObject(path, rs, "RTSTRUCT"), [1, 2, 3, 4], ct.grid)
    np.testing.assert_array_equal(union.astype(bool), ringed)
    # an empty mask: valid objects with an empty ROI / segment, and the command says so
    empty = sitk.GetImageFromArray(np.zeros(nodes.shape, np.uint8))
    empty.CopyInformation(read_image(root / "CT"))
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    capsys.readouterr()
    main(["data", "to-dicom", str(tmp_path / "empty.nii.gz"), "--series", str(root / "CT"),
          "--output", str(tmp_path / "empty")])
    assert "the mask is empty" in capsys.readouterr().err
    for path in (tmp_path / "empty").iterdir():
        assert dciodvfy_errors(path) == [], path.name
    assert "ContourSequence" not in pydicom.dcmread(tmp_path / "empty" / "empty_rtstruct.dcm").ROIContourSequence[0]


def test_a_ras_nifti_on_the_series_grid_is_accepted_and_off_grid_masks_and_non_dicom_series_are_refused(
    series, tmp_path, capsys
):
    root, nodes, _ = series
    # what a MONAI pipeline writes: the same voxels in RAS order (nibabel), mapped back without resampling
    image = read_image(root / "CT")
    lps = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lps, image.GetOrigin()
    ras = np.diag([-1, -1, 1, 1]) @ affine
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, nodes.shape[2] - 1  # store x reversed: a different voxel order, same voxels
    nib.save(nib.Nifti1Image(nodes.transpose(2, 1, 0)[::-1].astype(np.uint8), ras @ flip), tmp_path / "ras.nii.gz")
    main(["data", "to-dicom", str(tmp_path / "ras.nii.gz"), "--series", str(root / "CT"), "--format", "dicom-seg",
          "--output", str(tmp_path / "ras")])
    seg = hd.seg.segread(tmp_path / "ras" / "ras_seg.dcm")
    assert seg.get_volume(combine_segments=True).array.astype(bool).sum() == nodes.sum()
    shifted = sitk.ReadImage(str(root / "case7.nii.gz"))
    shifted.SetOrigin((ORIGIN[0] + 0.3, ORIGIN[1], ORIGIN[2]))
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    for mask, series_dir, message in [
        (tmp_path / "shifted.nii.gz", root / "CT", "is not on the series' voxel grid"),
        (root / "case7.nii.gz", tmp_path, "is not a DICOM CT series"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["data", "to-dicom", str(mask), "--series", str(series_dir), "--output", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert message in err and str(mask if "grid" in message else series_dir) in err
    assert not (tmp_path / "x").exists()


def test_anonymised_source_gets_derived_references_that_read_back(tmp_path, capsys):
    """A series whose data sets lack SOP Instance, Series and Study UIDs (as real anonymised files do): the objects
    reference the file meta's instance UIDs and derived series / study UIDs, say so, pass dciodvfy, and the
    index pairs them with the series again."""
    hu, nodes = phantom()
    write_ct(tmp_path / "study" / "CT", hu, empty_uids=True)
    mask = sitk.GetImageFromArray(nodes)
    mask.CopyInformation(read_image(tmp_path / "study" / "CT"))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    main(["data", "to-dicom", str(tmp_path / "m.nii.gz"), "--series", str(tmp_path / "study" / "CT"),
          "--output", str(tmp_path / "study" / "RT")])
    assert "has no SeriesInstanceUID" in capsys.readouterr().err
    for path in (tmp_path / "study" / "RT").iterdir():
        assert dciodvfy_errors(path) == [], path.name
    main(["data", "index", str(tmp_path / "study"), "dicom", "--structures", "lymph*",
          "--output", str(tmp_path / "datalist.json")])
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "datalist_labels" / "P001.nii.gz")))
    np.testing.assert_array_equal(label.astype(bool), nodes.astype(bool))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model"),
                                {"a_min": -100.0, "a_max": 200.0, "b_min": -2.0, "b_max": 4.0})


def test_predict_writes_nifti_seg_and_rtstruct_of_one_mask(series, tiny_model, tmp_path, capsys):
    root, _, uids = series
    out = tmp_path / "pred"
    main(["predict", str(root / "CT"), "--bundle", "ln_ct_dynunet", "--checkpoint", str(tiny_model),
          "--preset", "tiny", "--output", str(out), "--format", "nifti,dicom-seg,rtstruct"])
    nifti_path, seg_path, rs_path = output_paths(root / "CT", out, formats=("nifti", "dicom-seg", "rtstruct"))
    assert sorted(out.iterdir()) == sorted([nifti_path, seg_path, rs_path])
    assert seg_path.name == f"{root.name}_lymph_nodes_seg.dcm"  # the series folder 'CT' is named after its parent
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(nifti_path))).astype(bool)
    assert 0 < nifti.sum() < nifti.size  # random weights: some voxels of each class
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["series"]
    volume = seg.get_volume(combine_segments=True)
    z = volume.affine[2, 3] + np.arange(volume.spatial_shape[0]) * volume.affine[2, 0]
    np.testing.assert_array_equal(volume.array[np.argsort(z)].astype(bool), nifti)
    rs = pydicom.dcmread(rs_path)
    ct = next(iter(scan(root / "CT").series.values()))
    contours, _ = rasterise_rois(LabelObject(out, rs, "RTSTRUCT"), [1], ct.grid)
    np.testing.assert_array_equal(contours.astype(bool), nifti)
    for path in out.glob("*.dcm"):
        assert dciodvfy_errors(path) == [], path.name


def test_a_dicom_format_for_a_volume_input_is_refused_before_inference(series, tiny_model, tmp_path, capsys):
    root, _, _ = series
    with pytest.raises(SystemExit):
        main(["predict", str(root / "case7.nii.gz"), "--bundle", "ln_ct_dynunet", "--checkpoint", str(tiny_model),
              "--preset", "tiny", "--output", str(tmp_path / "pred"), "--format", "dicom-seg"])
    err = capsys.readouterr().err
    assert "needs DICOM series folders as input" in err and str(root / "case7.nii.gz") in err
    assert not (tmp_path / "pred").exists()
    with pytest.raises(SystemExit):
        main(["predict", str(root / "CT"), "--bundle", "ln_ct_dynunet", "--checkpoint", str(tiny_model),
              "--output", str(tmp_path / "pred"), "--format", "nifti,dicom"])
    assert "comma-separated list of nifti, dicom-seg, rtstruct" in capsys.readouterr().err


def test_monai_bundle_run_takes_output_format(series, tiny_model, tmp_path):
    """``python -m monai.bundle run`` users have the same choice: ``--output_format dicom-seg`` writes the SEG only."""
    root, _, _ = series
    out = tmp_path / "bundle_out"
    bundle = BUNDLES / "ln_ct_dynunet"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--preset", "tiny", "--checkpoint", str(tiny_model),
         "--datalist", f"['{root / 'CT'}']", "--output_dir", str(out), "--output_format", "dicom-seg"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (seg_path,) = output_paths(root / "CT", out, formats=("dicom-seg",))
    assert list(out.iterdir()) == [seg_path]
    assert dciodvfy_errors(seg_path) == []
