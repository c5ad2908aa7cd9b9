"""``data index`` for each supported layout, the intensity fingerprint, the dataset cards, and ``data synth``."""

from __future__ import annotations

import json
from pathlib import Path

import fire
import numpy as np
import pytest
import SimpleITK as sitk
from data_helpers import ct_volume, write, write_dicom_series

from dgst_monai.data.commands import DataCommands
from dgst_monai.data.datalists import ct_normalization, load_split
from dgst_monai.data.index import DEFAULTS, discover, index_dataset, intensity_properties
from dgst_monai.data.manifests import ManifestError, list_manifests, load_manifest, validate_manifest


def make_segrap(root: Path, n: int = 3, label_file: str = "GTVnd.nii.gz") -> dict[str, np.ndarray]:
    """SegRap-like folders; returns the foreground HU of each case."""
    fg = {}
    for i in range(n):
        hu, label = ct_volume(seed=i)
        case = root / f"segrap_{i:04d}"
        write(case / "image.nii.gz", hu)
        write(case / "image_contrast.nii.gz", hu + 100)
        write(case / label_file, label)
        write(case / "GTVp.nii.gz", np.zeros_like(label))  # another structure: must not be picked
        fg[case.name] = hu[label > 0].astype(float)
    return fg


def test_segrap2023_relative_paths_and_intensity(tmp_path: Path) -> None:
    root = tmp_path / "SegRap2023_Training_Set_120cases"
    fg = make_segrap(root)
    (root / "segrap_0099").mkdir()  # a case folder without files: skipped with a reason
    out = tmp_path / "lists" / "segrap.json"
    path, found = index_dataset(root, "segrap2023", out, verbose=False)
    content = json.loads(path.read_text(encoding="utf-8"))
    assert content["paths"] == "relative to this file's folder"
    assert content["training"][0] == {
        "case_id": "segrap_0000",
        "image": "../SegRap2023_Training_Set_120cases/segrap_0000/image.nii.gz",
        "label": "../SegRap2023_Training_Set_120cases/segrap_0000/GTVnd.nii.gz",
    }
    assert found.skipped and found.skipped[0][0] == "segrap_0099" and "no image" in found.skipped[0][1]
    cases = load_split(path)
    assert [c["case_id"] for c in cases] == ["segrap_0000", "segrap_0001", "segrap_0002"]
    assert all(Path(c["image"]).is_file() for c in cases)

    every = np.concatenate(list(fg.values()))  # few voxels: the sample is all of them, so exact
    props = content["intensity_properties"]
    assert props["percentile_00_5"] == pytest.approx(np.percentile(every, 0.5))
    assert props["percentile_99_5"] == pytest.approx(np.percentile(every, 99.5))
    assert props["mean"] == pytest.approx(every.mean()) and props["std"] == pytest.approx(every.std())
    norm = ct_normalization(path)
    assert norm["a_min"] == pytest.approx(props["percentile_00_5"])
    assert norm["b_min"] == pytest.approx((props["percentile_00_5"] - every.mean()) / every.std())


def test_segrap2023_options_absolute_and_label_dir(tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_segrap(images, n=2, label_file="LN.nii.gz")
    labels = tmp_path / "labels"
    for case in ("segrap_0000", "segrap_0001"):
        (labels / case).mkdir(parents=True)
        (images / case / "LN.nii.gz").rename(labels / case / "nodes.nii.gz")
    with pytest.raises(ValueError, match="no nodal label .*GTVnd.nii.gz"):
        discover(images, "segrap2023")
    path, _ = index_dataset(
        images, "segrap2023", tmp_path / "d.json", absolute=True, verbose=False,
        label_dir=str(labels), label_file="nodes.nii.gz", image_file="image_contrast.nii.gz",
    )
    first = json.loads(path.read_text(encoding="utf-8"))["training"][0]
    assert first["image"] == str(images / "segrap_0000" / "image_contrast.nii.gz")
    assert first["label"] == str(labels / "segrap_0000" / "nodes.nii.gz")


def test_lnq2023_nrrd_pairs(tmp_path: Path) -> None:
    hu, label = ct_volume()
    for split in ("val", "test"):
        for i in range(2):
            write(tmp_path / "lnq" / split / f"lnq2023-{split}-{i:04d}-ct.nrrd", hu)
            write(tmp_path / "lnq" / split / f"lnq2023-{split}-{i:04d}-seg.nrrd", label)
    write(tmp_path / "lnq" / "test" / "lnq2023-test-0009-ct.nrrd", hu)  # no segmentation
    found = discover(tmp_path / "lnq", "lnq2023")
    assert [c.case_id for c in found.cases] == [
        "lnq2023-test-0000", "lnq2023-test-0001", "lnq2023-val-0000", "lnq2023-val-0001",
    ]
    missing = tmp_path / "lnq" / "test" / "lnq2023-test-0009-seg.nrrd"
    assert found.skipped == [("lnq2023-test-0009", f"no segmentation {missing}")]


def test_nnunet_raw_layout(tmp_path: Path) -> None:
    root = tmp_path / "Dataset501_LN"
    hu, label = ct_volume()
    for folder, names in (("Tr", ["ln_001", "ln_002"]), ("Ts", ["ln_101"])):
        for name in names:
            write(root / f"images{folder}" / f"{name}_0000.nii.gz", hu)
            write(root / f"labels{folder}" / f"{name}.nii.gz", label)
    write(root / "imagesTs" / "ln_102_0000.nii.gz", hu)  # unlabelled test image: left out
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "lymph_node": 1},
        "numTraining": 2, "file_ending": ".nii.gz",
    }), encoding="utf-8")
    path, found = index_dataset(root, "nnunet", root / "datalist.json", verbose=False)
    content = json.loads(path.read_text(encoding="utf-8"))
    assert [c["case_id"] for c in content["training"]] == ["ln_001", "ln_002"]
    assert content["test"] == [
        {"case_id": "ln_101", "image": "imagesTs/ln_101_0000.nii.gz", "label": "labelsTs/ln_101.nii.gz"}
    ]
    assert content["labels"] == {"0": "background", "1": "lymph_node"}
    assert any(case == "ln_102" for case, _ in found.skipped)


def test_radcure_dicom_folders(tmp_path: Path) -> None:
    hu, label = ct_volume()
    root = tmp_path / "RADCURE"
    ct = write_dicom_series(root / "RADCURE-0001" / "01-01-2000-study" / "2.000000-CT", hu)
    write(tmp_path / "masks" / "RADCURE-0001.nii.gz", label)
    write_dicom_series(root / "RADCURE-0002" / "study" / "series", hu, series_uid="1.2.3.4.5")
    found = discover(root, "radcure", mask_dir=str(tmp_path / "masks"))
    assert [(c.case_id, c.image) for c in found.cases] == [("RADCURE-0001", ct)]
    assert found.skipped[0][0] == "RADCURE-0002" and "no LN mask" in found.skipped[0][1]
    with pytest.raises(ValueError, match="DICOM-SEG and RTSTRUCT masks are not supported"):
        discover(root, "radcure", mask_pattern="{case}/seg.dcm")


def test_index_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'brats'"):
        discover(tmp_path, "brats")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "nope", "segrap2023")
    with pytest.raises(ValueError, match="no segrap2023 case .* no case folder matching 'segrap_\\*'"):
        discover(tmp_path, "segrap2023")
    with pytest.raises(ValueError, match="option\\(s\\) label_suffix do not apply to segrap2023"):
        discover(tmp_path, "segrap2023", label_suffix="-seg.nrrd")


def test_intensity_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    hu, label = ct_volume(shape=(40, 40, 20))
    label[:] = 1
    case = {"image": str(write(tmp_path / "i.nii.gz", hu)), "label": str(write(tmp_path / "l.nii.gz", label))}
    a = intensity_properties([case], samples_per_case=500, seed=1)
    assert a == intensity_properties([case], samples_per_case=500, seed=1)
    assert a != intensity_properties([case], samples_per_case=500, seed=2)
    full = intensity_properties([case], samples_per_case=10**9)
    assert a["mean"] == pytest.approx(full["mean"], abs=4 * full["std"] / np.sqrt(500))


def test_index_command_line(tmp_path: Path) -> None:
    make_segrap(tmp_path / "data", n=2)
    out = tmp_path / "dl.json"
    command = ["index", str(tmp_path / "data"), "--dataset", "segrap2023", "--output", str(out)]
    text = fire.Fire(DataCommands, command=command)
    assert text.startswith(f"wrote {out}: 2 training and 0 test cases")
    with pytest.raises(ValueError, match="--mask_dir do\\(es\\) not apply to --dataset segrap2023"):
        DataCommands().index(str(tmp_path / "data"), "segrap2023", str(out), mask_dir="x")


def test_synth_command_with_preview(tmp_path: Path) -> None:
    text = DataCommands().synth(
        str(tmp_path / "syn"), domain="mediastinum", n=3, preview=True,
        fov_mm=[64, 64, 32], spacing_mm=[1, 1, 2], n_nodes=2, node_short_axis_mm=[5, 8],
    )
    datalist, png = (Path(p) for p in text.splitlines())
    assert len(load_split(datalist)) == 2 and png.name == "preview.png"
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))  # a PNG decoder other than ours reads it
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[0] == 64
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 40)
    assert red.any()  # the LN contour is drawn


def test_write_png_round_trip(tmp_path: Path) -> None:
    from dgst_monai.data.preview import write_png

    grey = (np.arange(35 * 17) % 256).astype(np.uint8).reshape(17, 35)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=2)
    for name, pixels in (("g.png", grey), ("c.png", rgb)):
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(write_png(tmp_path / name, pixels))))
        np.testing.assert_array_equal(back, pixels)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "x.png", grey.astype(np.int16))


# ------------------------------------------------------------------ dataset cards


def test_every_card_loads_and_matches_the_indexer() -> None:
    assert {"radcure", "segrap2023", "lnq2023", "synthetic"} <= set(list_manifests())
    for name in ("radcure", "segrap2023", "lnq2023", "synthetic"):
        card = load_manifest(name)
        assert card["name"] == name and card["modality"] == "CT"
        dataset = card["index"]["dataset"]
        if dataset in DEFAULTS:
            assert card["index"]["defaults"] == DEFAULTS[dataset], name  # the card documents the code's defaults


def test_cards_state_the_paper_protocol() -> None:
    segrap, lnq = load_manifest("segrap2023"), load_manifest("lnq2023")
    assert segrap["split_policy"]["few_shot"]["shots"] == [3, 5, 10]
    assert lnq["split_policy"]["few_shot"]["shots"] == [5, 10, 20]
    for card in (segrap, lnq):
        assert card["split_policy"]["train_test"]["test_fraction"] == 0.2
        assert card["split_policy"]["few_shot"]["seeds"] == [0, 1, 2] and card["split_policy"]["few_shot"]["nested"]
        assert card["cases"]["expected"] == 120
    assert "20 validation + 100 test" in lnq["label"]["derivation"]
    assert "GTVnd.nii.gz" in segrap["label"]["derivation"] and not segrap["label"]["verified"]
    assert load_manifest("radcure")["cases"]["expected"] == 3346


def test_invalid_cards_are_rejected_with_the_field(tmp_path: Path) -> None:
    card = load_manifest("segrap2023")
    broken = json.loads(json.dumps(card))
    del broken["source"]["licence"]
    with pytest.raises(ManifestError, match="missing field 'source.licence'"):
        validate_manifest(broken, "x.json")
    broken = json.loads(json.dumps(card))
    broken["split_policy"]["few_shot"]["shots"] = [10, 5]
    with pytest.raises(ManifestError, match="increasing positive integers"):
        validate_manifest(broken)
    broken["split_policy"]["few_shot"]["shots"] = [3, 500]
    with pytest.raises(ManifestError, match="500 shots exceed the 96 training cases"):
        validate_manifest(broken)
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "bad.json")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest("nonexistent")
