"""nnU-Net v2's resampling rule (``dgst_monai.resampling``) and the bundles' ``resampling`` setting: thick slices are
never blended, grids share their outer edges, the prediction comes back on the scan's exact grid, and (with
nnunetv2 installed) the arrays equal nnU-Net's own."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLES, TINY_NETWORK, save_tiny_checkpoint
from helpers import error_chain
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from dgst_monai import resampling
from dgst_monai.bundle.config_values import orientation
from dgst_monai.normalization import load_normalization, save_normalization
from dgst_monai.predict import predict
from dgst_monai.transforms import ResampleAndNormalized

NORMALIZATION = {"a_min": -100.0, "a_max": 200.0, "b_min": -2.0, "b_max": 4.0}


def test_thick_axis_follows_the_coarsest_unique_axis_of_the_first_anisotropic_grid():
    assert resampling.thick_axis((0.57, 0.57, 5.0), (0.8, 0.8, 2.5)) == 2
    assert resampling.thick_axis((5.0, 0.57, 0.57), (1.0, 1.0, 1.0)) == 0
    # the source is isotropic enough (ratio 3 is not above 3): the target decides
    assert resampling.thick_axis((1.0, 1.0, 3.0), (0.5, 2.0, 0.5)) == 1
    assert resampling.thick_axis((1.0, 1.1, 0.9), (1.5, 1.5, 1.5)) is None
    # two axes share the coarsest spacing: no separate axis, even if the other grid has one
    assert resampling.thick_axis((4.0, 4.0, 1.0), (0.8, 0.8, 2.5)) is None
    assert resampling.resampled_shape((202, 202, 64), (0.57, 0.57, 5.0), (0.8, 0.8, 2.5)) == (144, 144, 128)


def test_thick_slices_are_copied_whole_and_planes_stay_in_their_input_range():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(1, 21, 17, 6)).astype(np.float32)
    array[0, :, :, 3] += 10.0  # one slice far off the others: any blending along z would show
    out = resampling.resample(array, (30, 24, 12), axis=2, order=3)
    assert out.shape == (1, 30, 24, 12) and out.dtype == np.float32
    # each output slice is one input slice zoomed in-plane: output slices come in pairs, in order, as nearest
    # neighbours of the edge-aligned coordinates (k + 0.5) / 2 - 0.5
    for k in range(12):
        source = int(np.floor((k + 0.5) / 2))
        np.testing.assert_array_equal(out[0, :, :, k], out[0, :, :, 2 * source])
        assert array[0, :, :, source].min() <= out[0, :, :, k].min()
        assert out[0, :, :, k].max() <= array[0, :, :, source].max()  # the spline's overshoot is clipped per plane
    assert out[0, :, :, 6:8].min() > 5 and out[0, :, :, [5, 8]].max() < 5
    # the same shape in and out is the array itself
    assert resampling.resample(array, (21, 17, 6), axis=2, order=3) is array
    with pytest.raises(ValueError, match="spatial axes"):
        resampling.resample(array, (30, 24), axis=2, order=3)


def test_voxel_map_keeps_the_outer_edges_and_inverts():
    forward = resampling.voxel_map((144, 144, 128), (202, 202, 64))
    back = resampling.voxel_map((202, 202, 64), (144, 144, 128))
    np.testing.assert_allclose(forward @ back, np.eye(4), atol=1e-12)
    # the first voxel's outer edge (-0.5) and the last one's (m - 0.5) land on the old grid's edges
    for corner_new, corner_old in (((-0.5,) * 3, (-0.5,) * 3), ((143.5, 143.5, 127.5), (201.5, 201.5, 63.5))):
        np.testing.assert_allclose((forward @ [*corner_new, 1.0])[:3], corner_old, atol=1e-9)


@pytest.fixture()
def checkpoint(tmp_path):
    save_normalization(tmp_path, NORMALIZATION)
    return tmp_path / "model.pt"


def _thick_slice_scan(path, size=(40, 36, 9), spacing=(0.57, 0.57, 5.0), origin=(-11.0, 7.5, -40.0)):
    rng = np.random.default_rng(1)
    array = rng.normal(40.0, 120.0, size=size[::-1]).astype(np.int16)  # SimpleITK arrays are (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def _preprocessing(checkpoint, rule: str, orientation: str = "RAS"):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "ln_ct_dynunet" / "configs" / "inference.json"))
    parser["checkpoint"] = str(checkpoint)
    parser["resampling"] = rule
    parser["orientation"] = orientation
    parser["preset"] = TINY_NETWORK["ln_ct_dynunet"]["preset"]
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("spacing")


def test_bundle_nnunet_rule_normalises_first_then_resamples_and_inverts_to_the_scan_grid(checkpoint, tmp_path):
    scan = _thick_slice_scan(tmp_path / "ct.nii.gz")
    preprocessing, spacing = _preprocessing(checkpoint, "nnunet")
    data = preprocessing({"image": str(scan)})
    image = data["image"]
    # the scan as the bundle reads it (load, channel, RAS), before normalising and resampling
    ras = Compose(preprocessing.transforms[:3])({"image": str(scan)})["image"]
    assert tuple(ras.shape[1:]) == (40, 36, 9)

    values = load_normalization(checkpoint)
    scaled = (np.clip(ras.numpy(), values["a_min"], values["a_max"]) - values["a_min"]) / (
        values["a_max"] - values["a_min"])
    normalised = (scaled * (values["b_max"] - values["b_min"]) + values["b_min"]).astype(np.float32)
    shape = resampling.resampled_shape(ras.shape[1:], (0.57, 0.57, 5.0), spacing)
    expected = resampling.resample(normalised, shape, axis=2, order=3)
    assert tuple(image.shape) == (1, *shape)
    np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)
    # the bundles' own rule on the same scan blends thick slices, so the two differ
    monai_image = _preprocessing(checkpoint, "monai")[0]({"image": str(scan)})["image"]
    assert tuple(monai_image.shape[1:]) != shape or not np.allclose(monai_image.numpy(), expected, atol=1e-3)

    # both outer corners of the resampled grid stay where the scan's are, in world coordinates
    for new_corner, old_corner in (([-0.5] * 3, [-0.5] * 3), ([n - 0.5 for n in shape], [39.5, 35.5, 8.5])):
        np.testing.assert_allclose((image.affine.numpy() @ [*new_corner, 1.0])[:3],
                                   (ras.affine.numpy() @ [*old_corner, 1.0])[:3], atol=1e-4)

    # Invertd brings a prediction back to the scan's own grid and affine (the file's axes: orientation undone as
    # well); each thick slice takes the nearest
    # resampled slice, never a blend
    logits = torch.zeros(2, *shape)
    for k in range(shape[2]):
        logits[1, :, :, k] = float(k)
    data["pred"] = MetaTensor(logits, meta=image.meta)
    inverted = Invertd("pred", transform=preprocessing, orig_keys="image", nearest_interp=False)(data)["pred"]
    assert tuple(inverted.shape) == (2, 40, 36, 9)
    loaded = Compose(preprocessing.transforms[:2])({"image": str(scan)})["image"]
    np.testing.assert_allclose(inverted.affine.numpy(), loaded.affine.numpy(), atol=1e-5)
    along_z = inverted[1, 20, 18, :].numpy()
    assert np.array_equal(along_z, np.round(along_z)) and list(along_z) == sorted(along_z)


def test_orientation_file_keeps_the_scans_voxel_order(checkpoint, tmp_path):
    """nnU-Net predicts in the file's voxel order: ``orientation: file`` (export_nnunet's override sets it) skips
    the reorientation to RAS, which on an LPS scan (identity direction) mirrors x and y, and the inverted
    prediction still lands on the scan's grid."""
    scan = _thick_slice_scan(tmp_path / "ct.nii.gz")
    as_file = _preprocessing(checkpoint, "nnunet", orientation="file")[0]
    as_ras = _preprocessing(checkpoint, "nnunet")[0]
    assert [type(t).__name__ for t in as_ras.transforms].count("Orientationd") == 1
    assert "Orientationd" not in [type(t).__name__ for t in as_file.transforms]
    file_data = as_file({"image": str(scan)})
    file_image, ras_image = file_data["image"], as_ras({"image": str(scan)})["image"]
    # MONAI affines are RAS: the file's LPS axes point the other way in x and y
    assert np.array_equal(np.sign(np.diag(file_image.affine.numpy())[:3]), [-1.0, -1.0, 1.0])
    assert np.array_equal(np.sign(np.diag(ras_image.affine.numpy())[:3]), [1.0, 1.0, 1.0])
    # the same resampled voxels, mirrored in x and y (resampling keeps the outer edges, so it commutes with flips)
    torch.testing.assert_close(file_image.as_tensor(), ras_image.as_tensor().flip(1, 2), atol=1e-4, rtol=0)
    # voxel 0 of the file-order array is the file's voxel 0 (SimpleITK arrays are (z, y, x))
    raw = Compose(as_file.transforms[:2])({"image": str(scan)})["image"]
    assert float(raw[0, 0, 0, 0]) == float(sitk.GetArrayFromImage(sitk.ReadImage(str(scan)))[0, 0, 0])
    file_data["pred"] = MetaTensor(torch.zeros(2, *file_image.shape[1:]), meta=file_image.meta)
    inverted = Invertd("pred", transform=as_file, orig_keys="image", nearest_interp=False)(file_data)["pred"]
    assert tuple(inverted.shape) == (2, 40, 36, 9)
    np.testing.assert_allclose(inverted.affine.numpy(), raw.affine.numpy(), atol=1e-5)


def test_orientation_setting_is_checked_before_any_scan_is_read(checkpoint):
    assert [orientation(v) for v in ("ras", " File ", "LPI")] == ["RAS", "file", "LPI"]
    for bad in ("XYZ", "RRS", "RA", "RASL", None):
        with pytest.raises(ValueError, match="orientation must be 'file'"):
            orientation(bad)
    with pytest.raises(Exception) as failure:
        _preprocessing(checkpoint, "nnunet", orientation="XYZ")
    assert "orientation must be 'file'" in str(error_chain(failure.value)[-1])


def test_unknown_rule_is_refused(checkpoint):
    with pytest.raises(ValueError, match="monai, nnunet"):
        ResampleAndNormalized("image", pixdim=(1.0, 1.0, 1.0), checkpoint=checkpoint, resampling="cubic")


def test_predict_with_the_nnunet_rule_writes_masks_on_the_scan_grid(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path, NORMALIZATION)
    scan = _thick_slice_scan(tmp_path / "ct.nii.gz")
    masks = {}
    for rule in ("monai", "nnunet"):
        (output,) = predict(BUNDLES / "ln_ct_dynunet", scan, tmp_path / rule, checkpoint=checkpoint,
                            resampling=rule, **TINY_NETWORK["ln_ct_dynunet"])
        mask, image = sitk.ReadImage(output), sitk.ReadImage(str(scan))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
        masks[rule] = sitk.GetArrayFromImage(mask)
    assert not np.array_equal(masks["monai"], masks["nnunet"])  # the setting reaches the workflow


def test_arrays_equal_nnunet_v2s_own_resampling():
    nnunet = pytest.importorskip(
        "nnunetv2.preprocessing.resampling.default_resampling", reason="nnunetv2 is the [nnunet] extra"
    )
    rng = np.random.default_rng(0)
    # (z, y, x)-ordered shapes and spacings as nnU-Net holds them: thick slices, near-isotropic, thick target
    for shape, spacing, target in [((64, 41, 37), (5.0, 0.57, 0.57), (2.5, 0.8, 0.8)),
                                   ((30, 50, 40), (1.0, 1.1, 0.9), (1.5, 1.5, 1.5)),
                                   ((20, 33, 33), (3.0, 0.7, 0.7), (2.5, 0.8, 0.8))]:
        image = rng.normal(size=(1, *shape)).astype(np.float32)
        new_shape = resampling.resampled_shape(shape, spacing, target)
        assert new_shape == tuple(nnunet.compute_new_shape(shape, spacing, target))
        theirs = nnunet.resample_data_or_seg_to_shape(image, new_shape, spacing, target, is_seg=False, order=3,
                                                      order_z=0, force_separate_z=None)
        ours = resampling.resample(image, new_shape, resampling.thick_axis(spacing, target), order=3)
        np.testing.assert_array_equal(ours, theirs)
        logits = rng.normal(size=(2, *new_shape)).astype(np.float32)  # the export: logits back, linear
        theirs = nnunet.resample_data_or_seg_to_shape(logits, shape, target, spacing, is_seg=False, order=1,
                                                      order_z=0, force_separate_z=None)
        ours = resampling.resample(logits, shape, resampling.thick_axis(target, spacing), order=1)
        np.testing.assert_array_equal(ours, theirs)
