"""dgst_monai.data.cases: one rule for case ids, and every datalist entry carrying its id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import ct_volume, write, write_datalist

from dgst_monai.data.cases import (
    case_id_from_path,
    case_id_of,
    has_volume_suffix,
    strip_volume_suffix,
    with_case_ids,
)
from dgst_monai.data.datalists import few_shot, load_split
from dgst_monai.data.splits import make_splits
from dgst_monai.data.validate import check_datalist


def test_case_id_from_path() -> None:
    assert case_id_from_path("/data/segrap_0001/image.nii.gz") == "segrap_0001"
    assert case_id_from_path("/data/segrap_0001/image_contrast.nii.gz") == "segrap_0001"
    assert case_id_from_path("/data/case_001.NII.GZ") == "case_001"
    assert case_id_from_path("/data/lnq/lnq_0002-ct.nrrd") == "lnq_0002-ct"  # a path cannot know the layout
    assert case_id_from_path("/data/RADCURE-0001/") == "RADCURE-0001"  # a DICOM series folder
    assert case_id_from_path("image.nii.gz") == "image"  # a generic stem without a folder stays
    with pytest.raises(ValueError, match="empty path"):
        case_id_from_path("")


def test_suffixes() -> None:
    assert [strip_volume_suffix(n) for n in ("a.nii.gz", "a.nii", "a.MHA", "a.nhdr", ".nii.gz", "a.tar.gz")] == [
        "a", "a", "a", "a", ".nii.gz", "a.tar.gz",
    ]
    assert has_volume_suffix("/x/CT.NRRD") and not has_volume_suffix("/x/ct.dcm")


def test_entries_carry_their_id() -> None:
    assert case_id_of({"case_id": "LNQ2023_0007", "image": "/d/LNQ2023_0007-ct.nrrd"}) == "LNQ2023_0007"
    assert case_id_of({"image": ["/d/hn_0003.nii.gz", "/d/other.nii.gz"]}) == "hn_0003"
    assert case_id_of({"image": "/d/segrap_0004/image.nii.gz/"}) == "segrap_0004"
    assert case_id_of({"label": "x"}, 5) == "#5"
    entries = [{"image": "/d/a.nii.gz"}, {"case_id": "b", "image": "/d/x.nii.gz"}]
    assert with_case_ids(entries) == [dict(entries[0], case_id="a"), entries[1]]
    assert "case_id" not in entries[0]  # copies
    with pytest.raises(ValueError, match=r"my list: entries #0 and #1 have the same case id 'a'"):
        with_case_ids([{"image": "/d/a.nii.gz"}, {"image": "/e/a.nrrd"}], source="my list")


def test_one_id_in_loading_few_shot_splits_and_checks(tmp_path: Path) -> None:
    """A datalist without case ids: loading, few-shot subsets, splits.json and data check name cases alike. The
    splits file lies beside the case folders, so MONAI's loader would turn its ids into those folders' paths."""
    hu, label = ct_volume()
    training = []
    for i in range(4):
        image = write(tmp_path / f"segrap_{i:04d}" / "image.nii.gz", hu)
        mask = write(tmp_path / f"segrap_{i:04d}" / "GTVnd.nii.gz", label)
        training.append({"image": str(image.relative_to(tmp_path)), "label": str(mask.relative_to(tmp_path))})
    datalist = write_datalist(tmp_path / "datalist.json", training)
    cases = load_split(datalist)
    ids = [f"segrap_{i:04d}" for i in range(4)]
    assert [c["case_id"] for c in cases] == ids
    splits = make_splits(datalist, shots=[2], seeds=[0], output=tmp_path / "splits.json", intensity="copy")
    shots = few_shot(load_split(tmp_path / "splits.json", "training"), 2, seed=0)
    assert [c["case_id"] for c in shots] == splits["few_shot"]["0"]["2"]
    assert sorted(c["case_id"] for c in splits["training"] + splits["test"]) == ids
    assert json.loads((tmp_path / "splits.json").read_text(encoding="utf-8"))["few_shot"] == splits["few_shot"]
    assert check_datalist(datalist) == []  # in particular: no duplicate ids although every stem is "image"

    write_datalist(tmp_path / "twice.json", [training[0], dict(training[0])])
    with pytest.raises(ValueError, match="same case id 'segrap_0000'"):
        load_split(tmp_path / "twice.json")
