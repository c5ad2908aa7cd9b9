"""CT series found under a folder: transfer syntaxes, grouping by UID, anonymised files, tilted and gapped series."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import SYNTAXES, phantom, write_ct

from dgst_monai.data.readers import read_image
from dgst_monai.dicom.series import scan


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_every_transfer_syntax_reads_back_the_hounsfield_units(syntax, tmp_path):
    """Uncompressed (explicit and implicit VR), RLE, JPEG 2000 and JPEG-LS lossless series, in files without a
    ``.dcm`` ending, are one series each and read voxel for voxel with the geometry written."""
    hu, _ = phantom()
    uids = write_ct(tmp_path / "ct", hu, syntax=syntax, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 5.0, -60.0))
    found = scan(tmp_path)
    assert list(found.series) == [uids["series"]]
    series = found.series[uids["series"]]
    assert not series.problems and series.grid.shape == (40, 48, 12)
    assert series.grid.spacing == pytest.approx((0.7, 0.8, 2.5)) and series.grid.origin == pytest.approx((-10, 5, -60))
    image = read_image(tmp_path / "ct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
    assert image.GetOrigin() == pytest.approx(series.grid.origin) and image.GetSpacing() == pytest.approx(series.grid.spacing)


def test_series_are_grouped_by_uid_and_anonymised_files_get_a_derived_uid(tmp_path):
    """Two series mixed in one folder stay apart; a series whose data sets have empty UIDs (the file meta keeps
    the instance UID) is grouped by folder and plane and gets the same derived UIDs on every scan."""
    hu, _ = phantom()
    a = write_ct(tmp_path / "mixed", hu, suffix=".dcm")
    b = write_ct(tmp_path / "mixed", hu[:6], origin=(-20.0, -30.0, 40.0), suffix="_b.dcm")
    write_ct(tmp_path / "anonymised", hu, empty_uids=True)
    (tmp_path / "notes.txt").write_text("not DICOM")
    found = scan(tmp_path)
    assert {a["series"], b["series"]} < set(found.series) and len(found.series) == 3
    assert len(found.series[a["series"]].files) == 12 and len(found.series[b["series"]].files) == 6
    assert found.not_dicom == 1
    (derived,) = (s for s in found.series.values() if s.derived_uids)
    assert set(derived.derived_uids) == {"SeriesInstanceUID", "StudyInstanceUID"}
    assert all(uid for uid in derived.sop_instance_uids)  # from the file meta
    assert derived.uid == next(s.uid for s in scan(tmp_path).series.values() if s.derived_uids)
    # slices are ordered along the normal whatever the file names say
    z = [float(h.ImagePositionPatient[2]) for h in derived.headers]
    assert z == sorted(z)


def test_tilted_gapped_and_duplicated_series_are_named(tmp_path):
    hu, _ = phantom()
    write_ct(tmp_path / "tilted", hu, tilt_mm=0.5)
    write_ct(tmp_path / "gap", hu[:4], positions=[0.0, 2.0, 4.0, 8.0])
    write_ct(tmp_path / "twice", hu[:3], positions=[0.0, 2.0, 2.0])
    problems = {s.folder.name: " ".join(s.problems) for s in scan(tmp_path).series.values()}
    assert "gantry-tilted" in problems["tilted"]
    assert "non-uniform slice spacing" in problems["gap"] and "2 to 4 mm" in problems["gap"]
    assert "duplicate slices" in problems["twice"]


@pytest.mark.parametrize(("syntax", "cut"), [("explicit", 300), ("explicit", 2000), ("jpeg2000", -8)])
def test_a_file_cut_short_is_named_and_left_out_of_its_series(syntax, cut, tmp_path):
    """pydicom reads a truncated file without complaint; the scan names it (header cut, pixel data cut, an
    encapsulated frame cut) instead of letting a short slice into the series."""
    hu, _ = phantom()
    write_ct(tmp_path / "ct", hu, syntax=syntax)
    victim = tmp_path / "ct" / "IM0003"
    victim.write_bytes(victim.read_bytes()[:cut])
    found = scan(tmp_path)
    assert [p.name for p, _ in found.unreadable] == ["IM0003"]
    assert all(len(s.files) == 11 for s in found.series.values())
