"""NIfTI / NRRD / DICOM-series round trips: index, then load through the bundle's MONAI transform chain.

The loaded affine must equal the SimpleITK (LPS) geometry converted to RAS, voxel values must survive (DICOM:
through the rescale intercept), and Orientationd + Spacingd must keep the label where it is in the world.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from data_helpers import (
    ORIGIN,
    SPACING,
    ct_volume,
    lps_geometry_to_ras,
    rotation_z,
    write,
    write_dicom_series,
)
from helpers import REPO
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

from dgst_monai.data.datalists import ct_normalization, load_split
from dgst_monai.data.index import index_dataset
from dgst_monai.data.readers import SimpleITKReader

READER = "dgst_monai.data.readers.SimpleITKReader"
TARGET_SPACING = (1.0, 1.0, 2.0)


def bundle_chain(reader: str | type = READER) -> Compose:
    """The loading part of bundles/ln_ct_dynunet/configs/train.json ``preprocessing``, with the reader set."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys, image_only=True, reader=reader),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS"),
            Spacingd(keys, pixdim=TARGET_SPACING, mode=["bilinear", "nearest"]),
        ]
    )


def load_only(reader: str | type = READER) -> Compose:
    keys = ["image", "label"]
    return Compose([LoadImaged(keys, image_only=True, reader=reader), EnsureChannelFirstd(keys)])


def label_centroid_ras(label: torch.Tensor) -> np.ndarray:
    """World (RAS) centroid of a loaded (1, X, Y, Z) label MetaTensor."""
    idx = np.argwhere(np.asarray(label[0]) > 0.5).mean(axis=0)
    affine = np.asarray(label.affine, dtype=float)
    return affine[:3, :3] @ idx + affine[:3, 3]


def check_round_trip(case: dict, hu: np.ndarray, geometry: dict) -> None:
    """Affine = SimpleITK geometry in RAS, values intact, and the label stays put through Orientation/Spacing."""
    expected = lps_geometry_to_ras(geometry["spacing"], geometry["origin"], geometry["direction"])
    raw = load_only()(dict(case))
    np.testing.assert_allclose(np.asarray(raw["image"].affine), expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(raw["label"].affine), expected, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(raw["image"][0]), hu.astype(np.float32))
    centroid = label_centroid_ras(raw["label"])

    out = bundle_chain()(dict(case))
    image, label = out["image"], out["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    np.testing.assert_allclose(np.asarray(image.pixdim), TARGET_SPACING, atol=1e-5)
    affine = np.asarray(image.affine, dtype=float)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(label_centroid_ras(label), centroid, atol=max(TARGET_SPACING))
    np.testing.assert_allclose(np.asarray(label.affine), affine, atol=1e-3)  # NIfTI stores float32 geometry


def test_nrrd_round_trip_through_index_and_bundle_chain(tmp_path: Path) -> None:
    hu, label = ct_volume()
    geometry = {"spacing": SPACING, "origin": ORIGIN, "direction": rotation_z(12.0)}
    root = tmp_path / "lnq"
    for name in ("case_a", "case_b"):
        write(root / f"{name}-ct.nrrd", hu, **geometry)
        write(root / f"{name}-seg.nrrd", label, **geometry)
    datalist, _ = index_dataset(root, "lnq2023", tmp_path / "out" / "datalist.json", verbose=False)
    cases = load_split(datalist, "training")
    assert [c["case_id"] for c in cases] == ["case_a", "case_b"]
    # Paths are relative to the datalist's folder.
    assert json.loads(datalist.read_text(encoding="utf-8"))["training"][0]["image"] == "../lnq/case_a-ct.nrrd"
    check_round_trip(cases[0], hu, geometry)


def test_dicom_series_round_trip_through_index_and_bundle_chain(tmp_path: Path) -> None:
    hu, label = ct_volume()
    geometry = {"spacing": SPACING, "origin": ORIGIN, "direction": rotation_z(-20.0)}
    root = tmp_path / "radcure"
    series = write_dicom_series(root / "RADCURE-0001" / "study" / "2.000-CT", hu, **geometry)
    masks = tmp_path / "masks"
    write(masks / "RADCURE-0001.nii.gz", label, **geometry)
    datalist, found = index_dataset(root, "radcure", tmp_path / "datalist.json", mask_dir=str(masks), verbose=False)
    assert [c.image for c in found.cases] == [series]
    cases = load_split(datalist, "training")
    assert Path(cases[0]["image"]).is_dir()

    # The reader sees what GDCM sees: HU after the rescale intercept, geometry from the slice tags.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))
    reference = sitk.ReadImage(files)
    np.testing.assert_allclose(reference.GetSpacing(), SPACING, atol=1e-5)
    np.testing.assert_allclose(reference.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(reference.GetDirection(), geometry["direction"], atol=1e-5)
    check_round_trip(cases[0], hu, geometry)

    props = json.loads(datalist.read_text(encoding="utf-8"))["intensity_properties"]
    fg = hu[label > 0].astype(float)
    assert props["mean"] == pytest.approx(fg.mean()) and props["std"] == pytest.approx(fg.std())
    assert ct_normalization(datalist)["a_min"] == pytest.approx(np.percentile(fg, 0.5))


def test_nifti_reader_matches_nibabel(tmp_path: Path) -> None:
    """For NIfTI the SimpleITK reader and MONAI's default (nibabel) give the same voxels and affine."""
    hu, label = ct_volume()
    flip = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # a RAS-ordered array, as some NIfTI writers store
    case = {
        "image": str(write(tmp_path / "ct.nii.gz", hu, direction=flip)),
        "label": str(write(tmp_path / "ln.nii.gz", label, direction=flip)),
    }
    ours = bundle_chain()(dict(case))
    theirs = bundle_chain(reader="NibabelReader")(dict(case))
    np.testing.assert_allclose(np.asarray(ours["image"].affine), np.asarray(theirs["image"].affine), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["image"]), np.asarray(theirs["image"]), atol=1e-2)
    np.testing.assert_array_equal(np.asarray(ours["label"]), np.asarray(theirs["label"]))


def test_reader_class_and_suffixes(tmp_path: Path) -> None:
    reader = SimpleITKReader()
    assert reader.verify_suffix("a.nrrd") and reader.verify_suffix("a.nii.gz") and reader.verify_suffix(str(tmp_path))
    assert not reader.verify_suffix("a.png")
    hu, _ = ct_volume()
    a, b = write(tmp_path / "a.nrrd", hu), write(tmp_path / "b.nrrd", hu)
    array, meta = reader.get_data(reader.read([a, b]))  # two files: stacked as channels
    assert array.shape == (2, *hu.shape) and meta["original_channel_dim"] == 0


def test_bundle_preprocessing_config_loads_nrrd_with_the_reader(tmp_path: Path) -> None:
    """The bundle's own preprocessing (train.json), with only LoadImaged's reader set, reads NRRD."""
    from monai.bundle import ConfigParser

    config = REPO / "bundles" / "ln_ct_dynunet" / "configs" / "train.json"
    parser = ConfigParser()
    parser.read_config(str(config))
    transforms = parser["preprocessing"]["transforms"]
    load = next(i for i, t in enumerate(transforms) if t.get("_target_") == "LoadImaged")

    hu, label = ct_volume()
    root = tmp_path / "lnq"
    write(root / "x-ct.nrrd", hu, direction=rotation_z(5.0))
    write(root / "x-seg.nrrd", label, direction=rotation_z(5.0))
    datalist, _ = index_dataset(root, "lnq2023", tmp_path / "datalist.json", verbose=False)
    parser[f"preprocessing#transforms#{load}#reader"] = READER
    parser["datalist"] = str(datalist)
    parser["spacing"] = list(TARGET_SPACING)
    out = parser.get_parsed_content("preprocessing", instantiate=True)(load_split(datalist)[0])
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.uint8
    assert int(out["label"].sum()) > 0
    np.testing.assert_allclose(np.asarray(out["image"].pixdim), TARGET_SPACING, atol=1e-5)
