"""``data check``: every bad-input class gives a clear message naming the case and the problem, a folder with
several bad cases reports all of them in one table, the exit code is non-zero, and no file is modified."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import ORIGIN, ct_volume, rotation_z, write, write_datalist, write_dicom_series

from dgst_monai.data.commands import DataCommands
from dgst_monai.data.validate import Problem, check_datalist, format_problems


def good_case(root: Path, cid: str, suffix: str = ".nii.gz") -> dict[str, str]:
    hu, label = ct_volume(seed=len(cid))
    write(root / f"{cid}_ct{suffix}", hu)
    write(root / f"{cid}_ln{suffix}", label)
    return {"case_id": cid, "image": f"{cid}_ct{suffix}", "label": f"{cid}_ln{suffix}"}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def set_nifti_pixdim(path: Path, axis: int, value: float) -> None:
    """Patch pixdim[axis] of an uncompressed NIfTI-1 header in place (byte offset 76 + 4 * axis)."""
    data = bytearray(path.read_bytes())
    data[76 + 4 * axis : 80 + 4 * axis] = struct.pack("<f", value)
    path.write_bytes(bytes(data))


# Each builder makes one bad case in ``root`` and returns (datalist entry, split, expected message fragment).
Builder = Callable[[Path], tuple[dict[str, str], str, str]]


def _missing(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "missing")
    (root / case["label"]).unlink()
    return case, "training", "missing file"


def _unreadable(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "unreadable")
    (root / case["image"]).write_bytes(b"this is not an image")
    return case, "training", "unreadable image"


def _truncated_gz(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "trunc_gz")
    truncate(root / case["image"])
    return case, "training", "truncated"


def _truncated_nii(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "trunc_nii", suffix=".nii")
    truncate(root / case["label"], keep=0.8)
    return case, "training", "truncated file"


def _truncated_nrrd(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "trunc_nrrd", suffix=".nrrd")
    truncate(root / case["image"], keep=0.7)
    return case, "training", "unreadable or truncated image voxel data"


def _size_mismatch(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "size")
    _, label = ct_volume(shape=(32, 32, 15))
    write(root / case["label"], label)
    return case, "training", "label size [32, 32, 15] != image size [32, 32, 16]"


def _spacing_mismatch(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "spacing")
    _, label = ct_volume()
    write(root / case["label"], label, spacing=(0.8, 0.9, 3.0))
    return case, "training", "label spacing"


def _origin_mismatch(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "origin")
    _, label = ct_volume()
    write(root / case["label"], label, origin=(ORIGIN[0] + 1.5, ORIGIN[1], ORIGIN[2]))
    return case, "training", "label origin"


def _direction_mismatch(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "direction")
    _, label = ct_volume()
    write(root / case["label"], label, direction=rotation_z(5.0))
    return case, "training", "label direction"


def _not_3d(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "flat")
    hu, _ = ct_volume()
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu[:, :, 0].T))
    sitk.WriteImage(image, str(root / case["image"]))
    return case, "training", "not a 3-D image"


def _non_integer_label(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "fractional")
    _, label = ct_volume()
    write(root / case["label"], label.astype(np.float32) * 0.5)
    return case, "training", "non-integer values"


def _unexpected_values(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "values")
    _, label = ct_volume()
    label[0, 0, 0] = 7
    write(root / case["label"], label)
    return case, "training", "unexpected label values 7"


def _empty_label(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "empty")
    _, label = ct_volume()
    write(root / case["label"], np.zeros_like(label))
    return case, "training", "empty label"


def _nan(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "nan")
    hu, _ = ct_volume()
    image = hu.astype(np.float32)
    image[1, 2, 3], image[4, 5, 6] = np.nan, np.inf
    write(root / case["image"], image)
    return case, "training", "1 NaN and 1 infinite voxels"


def _normalised(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "normalised")
    hu, _ = ct_volume()
    write(root / case["image"], ((hu + 1000) / 3000.0).astype(np.float32))
    return case, "training", "implausible HU range"


def _off_scale(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "off_scale")
    hu, _ = ct_volume()
    hu[0, 0, 0] = -32000
    write(root / case["image"], hu)
    return case, "training", "outside the CT scale"


def _zero_spacing(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "zero_sp", suffix=".nii")
    set_nifti_pixdim(root / case["image"], 1, 0.0)
    return case, "training", "zero or negative spacing"


def _negative_spacing(root: Path) -> tuple[dict[str, str], str, str]:
    case = good_case(root, "neg_sp", suffix=".nii")
    set_nifti_pixdim(root / case["label"], 3, -2.5)
    return case, "training", "zero or negative spacing"


def _dicom_gap(root: Path) -> tuple[dict[str, str], str, str]:
    hu, label = ct_volume()
    write_dicom_series(root / "gap_dicom", hu, skip=(7,))
    write(root / "gap_ln.nii.gz", label)
    return {"case_id": "gap", "image": "gap_dicom", "label": "gap_ln.nii.gz"}, "training", "irregular slice spacing"


BAD: dict[str, Builder] = {
    "missing file": _missing,
    "unreadable file": _unreadable,
    "truncated nii.gz": _truncated_gz,
    "truncated nii": _truncated_nii,
    "truncated nrrd": _truncated_nrrd,
    "size mismatch": _size_mismatch,
    "spacing mismatch": _spacing_mismatch,
    "origin mismatch": _origin_mismatch,
    "direction mismatch": _direction_mismatch,
    "non-3D image": _not_3d,
    "non-integer label": _non_integer_label,
    "unexpected label values": _unexpected_values,
    "empty training label": _empty_label,
    "NaN / inf": _nan,
    "normalised, not HU": _normalised,
    "off the CT scale": _off_scale,
    "zero spacing": _zero_spacing,
    "negative spacing": _negative_spacing,
    "DICOM series with a missing slice": _dicom_gap,
}


def fingerprint(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_bad_input_is_reported_with_case_and_problem(tmp_path: Path, kind: str) -> None:
    ok = good_case(tmp_path, "ok_0")
    bad, split, fragment = BAD[kind](tmp_path)
    datalist = write_datalist(tmp_path / "datalist.json", [ok, bad])
    problems = check_datalist(datalist)
    assert problems, kind
    assert {p.case_id for p in problems} == {bad["case_id"]}, format_problems(problems)
    assert any(fragment in p.problem for p in problems), format_problems(problems)
    assert all(p.split == split for p in problems)


def test_duplicate_case_ids_and_files(tmp_path: Path) -> None:
    a = good_case(tmp_path, "dup")
    b = dict(a)
    c = {**a, "case_id": "other"}
    problems = check_datalist(write_datalist(tmp_path / "datalist.json", [a], test=[b, c]))
    texts = format_problems(problems)
    found = [(p.case_id, p.split, p.problem) for p in problems]
    assert ("dup", "test", "duplicate case id (also training #0)") in found, texts
    assert any(p.case_id == "other" and "same image file as case dup" in p.problem for p in problems), texts


def test_empty_label_is_fine_in_a_test_case(tmp_path: Path) -> None:
    ok = good_case(tmp_path, "ok")
    empty, _, _ = _empty_label(tmp_path)
    assert check_datalist(write_datalist(tmp_path / "datalist.json", [ok], test=[empty])) == []


def test_missing_entries_and_bad_datalists(tmp_path: Path) -> None:
    ok = good_case(tmp_path, "ok")
    problems = check_datalist(write_datalist(tmp_path / "d.json", [ok, {"case_id": "nolabel", "image": ok["image"]}]))
    assert ("nolabel", "no 'label' entry") in [(p.case_id, p.problem) for p in problems]
    assert "does not exist" in check_datalist(tmp_path / "absent.json")[0].problem
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    assert "not readable JSON" in check_datalist(tmp_path / "broken.json")[0].problem
    assert "no (non-empty) 'training' list" in check_datalist(write_datalist(tmp_path / "e.json", []))[0].problem


def test_all_problems_of_a_folder_in_one_table_and_nonzero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [good_case(tmp_path, "ok_0")]
    expected: dict[str, str] = {}
    builders = (_missing, _truncated_gz, _origin_mismatch, _non_integer_label, _empty_label, _nan, _zero_spacing)
    for build in (*builders, _dicom_gap):
        case, _, fragment = build(tmp_path)
        cases.append(case)
        expected[case["case_id"]] = fragment
    cases.append(good_case(tmp_path, "ok_1"))
    datalist = write_datalist(tmp_path / "datalist.json", cases)
    before = fingerprint(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        fire.Fire(DataCommands, command=["check", str(datalist)])
    assert exit_info.value.code == 1
    table = capsys.readouterr().out
    for cid, fragment in expected.items():
        row = [line for line in table.splitlines() if line.startswith(cid) and fragment in line]
        assert row, f"{cid}: {fragment!r} not in\n{table}"
    assert "ok_0" not in table and "ok_1" not in table
    assert f"in {len(expected)} case(s)" in table
    assert fingerprint(tmp_path) == before  # the source data are never modified


def test_clean_datalist_passes(tmp_path: Path) -> None:
    hu, label = ct_volume()
    write_dicom_series(tmp_path / "series", hu, direction=rotation_z(8.0))
    write(tmp_path / "series_ln.nrrd", label, direction=rotation_z(8.0))
    dicom = {"case_id": "d", "image": "series", "label": "series_ln.nrrd"}
    cases = [good_case(tmp_path, "a"), good_case(tmp_path, "b", ".nrrd"), dicom]
    datalist = write_datalist(tmp_path / "datalist.json", cases)
    assert check_datalist(datalist) == []
    assert "3 cases checked, no problems found" in DataCommands().check(str(datalist))


def test_table_format() -> None:
    problems = [Problem("c1", "training", "/data/c1.nii.gz", "empty label"), Problem("c2", "test", "-", "x")]
    table = format_problems(problems)
    lines = table.splitlines()
    assert lines[0].split() == ["case", "split", "file", "problem"]
    assert lines[2].startswith("c1") and lines[-1] == "2 problem(s) in 2 case(s)"
    assert format_problems([]) == "no problems found"


def test_nifti_spacing_check_reads_the_raw_header(tmp_path: Path) -> None:
    """ITK and nibabel.load both report spacing 1 for a zero pixdim; the check must see the header's own 0."""
    case = good_case(tmp_path, "z", suffix=".nii")
    set_nifti_pixdim(tmp_path / case["image"], 2, 0.0)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp_path / case["image"]))
    reader.ReadImageInformation()
    assert reader.GetSpacing()[1] == 1.0  # what ITK says
    assert nib.load(str(tmp_path / case["image"])).header["pixdim"][2] == 1.0  # nibabel fixes it on load
    problems = check_datalist(write_datalist(tmp_path / "datalist.json", [case]))
    assert [p.problem for p in problems] == ["image has zero or negative spacing [0.8, 0, 2.5]"]


def test_quick_check_reads_headers_only(tmp_path: Path) -> None:
    origin, _, origin_text = _origin_mismatch(tmp_path)
    nan, _, _ = _nan(tmp_path)
    datalist = write_datalist(tmp_path / "datalist.json", [origin, nan])
    quick = check_datalist(datalist, voxels=False)
    assert [(p.case_id, origin_text in p.problem) for p in quick] == [("origin", True)]
    assert {p.case_id for p in check_datalist(datalist)} == {"origin", "nan"}
