"""Inference keeps the input's exact geometry, windows weigh voxels as nnU-Net does, and test-time mirroring
averages probabilities over flips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLES, TINY_NETWORK
from monai.inferers import SimpleInferer, SlidingWindowInferer

from dgst_monai.inferers import (
    GaussianSlidingWindowInferer,
    MirroringInferer,
    centred_gaussian,
    window_starts,
)
from dgst_monai.predict import find_inputs, mask_path, predict


def _rotation(ax: float, az: float) -> np.ndarray:
    """A rotation about x by ``ax`` then about z by ``az`` (radians), as a 3x3 direction matrix."""
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


#: (name, size, spacing, origin, direction) of the test inputs, in SimpleITK's LPS world.
CASES = [
    ("anisotropic_lps", (40, 36, 10), (0.7, 0.9, 3.0), (-20.0, 15.5, -102.25), np.eye(3)),
    ("ras_axes", (36, 40, 12), (0.8, 0.8, 2.5), (25.0, 30.0, 40.0), np.diag([-1.0, -1.0, 1.0])),
    ("oblique", (38, 34, 11), (0.75, 0.85, 2.0), (-5.5, 7.25, 60.0), _rotation(math.radians(12), math.radians(25))),
    ("permuted_axes", (12, 40, 36), (3.0, 0.8, 0.9), (1.0, -2.0, 3.0), np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0.0]])),
]


def _write_ct(path, size, spacing, origin, direction) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 30.0, size=size[::-1]).astype(np.int16)  # SimpleITK arrays are (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))


def test_masks_keep_the_input_geometry(tiny_checkpoint, tmp_path):
    """Anisotropic, RAS-ordered, oblique and axis-permuted NIfTI and NRRD inputs: the mask's size, spacing, origin
    and direction equal the input's (SimpleITK, 1e-4)."""
    inputs = []
    (tmp_path / "in").mkdir()
    for name, size, spacing, origin, direction in CASES:
        for ext in (".nii.gz", ".nrrd"):
            path = tmp_path / "in" / f"{name}_{ext.split('.')[-1]}{ext}"
            _write_ct(path, size, spacing, origin, direction)
            inputs.append(path)
    outputs = predict(
        BUNDLES / "ln_ct_dynunet", tmp_path / "in", tmp_path / "out", checkpoint=tiny_checkpoint,
        **TINY_NETWORK["ln_ct_dynunet"],
    )  # fmt: skip
    assert outputs == [str(mask_path(p, tmp_path / "out")) for p in sorted(inputs)]
    for source, output in zip(sorted(inputs), outputs):
        image, mask = sitk.ReadImage(str(source)), sitk.ReadImage(output)
        assert mask.GetSize() == image.GetSize(), source.name
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-4, err_msg=source.name)
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4, err_msg=source.name)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-4, err_msg=source.name)
        assert mask.GetPixelID() == sitk.sitkUInt8
        assert set(np.unique(sitk.GetArrayViewFromImage(mask))) <= {0, 1}


def test_mirroring_flag_runs_end_to_end(tiny_checkpoint, tmp_path):
    """``mirror=True`` (8 flips per window) writes a mask of the same geometry."""
    _write_ct(tmp_path / "ct.nii.gz", (30, 30, 8), (0.9, 0.9, 3.0), (1.0, 2.0, 3.0), np.eye(3))
    (output,) = predict(
        BUNDLES / "ln_ct_dynunet", tmp_path / "ct.nii.gz", tmp_path / "out", checkpoint=tiny_checkpoint,
        mirror=True, **TINY_NETWORK["ln_ct_dynunet"],
    )  # fmt: skip
    assert sitk.ReadImage(output).GetSize() == (30, 30, 8)


def test_mirroring_inferer_averages_softmax_over_flips():
    """softmax of the output is the mean of the flipped-back softmaxes; disabled, the logits pass through."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, kernel_size=3, padding=1)  # not flip-invariant
    x = torch.randn(2, 1, 8, 6, 4)
    with torch.no_grad():
        out = MirroringInferer(SimpleInferer(), spatial_axes=(0, 2))(x, net)
        expected = sum(
            torch.flip(torch.softmax(net(torch.flip(x, d) if d else x), 1), d) if d else torch.softmax(net(x), 1)
            for d in [(), (2,), (4,), (2, 4)]
        ) / 4
        torch.testing.assert_close(torch.softmax(out, 1), expected)
        torch.testing.assert_close(MirroringInferer(SimpleInferer(), enabled=False)(x, net), net(x))
        # around a sliding window: every window is mirrored, the result is still a distribution
        windowed = MirroringInferer(SlidingWindowInferer(roi_size=(4, 4, 4), overlap=0.5))(x, net)
        torch.testing.assert_close(torch.softmax(windowed, 1).sum(1), torch.ones(2, 8, 6, 4))
    with pytest.raises(ValueError, match="distinct"):
        MirroringInferer(SimpleInferer(), spatial_axes=(0, 0))


def test_centred_gaussian_peaks_on_the_middle_voxel_and_never_weighs_zero():
    weights = centred_gaussian((6, 5, 96))
    assert weights.shape == (6, 5, 96) and weights.dtype == torch.float32
    assert tuple(int(i) for i in np.unravel_index(int(weights.argmax()), weights.shape)) == (3, 2, 48)
    assert weights.max().item() == 1.0 and weights.min().item() > 0
    # symmetric about n // 2 along each axis: voxel 48 - d weighs what 48 + d does
    assert torch.equal(weights[3, 2, 48 - 20], weights[3, 2, 48 + 20])
    # MONAI's map peaks between voxels 47 and 48 of an even axis, so the two differ there
    monai_map = SlidingWindowInferer((6, 5, 96), mode="gaussian", cache_roi_weight_map=True).roi_weight_map
    assert monai_map[3, 2, 47] == monai_map[3, 2, 48] and weights[3, 2, 47] < weights[3, 2, 48]


def test_gaussian_sliding_window_uses_centred_weights_and_keeps_a_constant_output():
    inferer = GaussianSlidingWindowInferer(roi_size=(16, 16, 8), sw_batch_size=2, overlap=0.5)
    assert torch.equal(inferer.roi_weight_map, centred_gaussian((16, 16, 8)))
    image = torch.randn(1, 1, 40, 36, 20, generator=torch.Generator().manual_seed(0))
    # weights are normalised per voxel: an identity network gives the image back, a window-wise shift does not
    assert torch.allclose(inferer(image, lambda x: x), image, atol=1e-5)
    calls = iter(range(1000))
    shifted = inferer(image, lambda x: x + float(next(calls)))
    assert not torch.allclose(shifted, image, atol=1e-3)


def test_windows_start_where_nnunet_places_them():
    """On a 256-voxel axis 96-voxel windows start at 0, 40, 80, 120, 160 (nnU-Net's places), not MONAI's 0, 48,
    96, 144, 160; a fractional step is rounded per window (312: 43.2 voxels), not once for the axis."""
    starts: list[tuple[int, int, int]] = []

    def record(patch: torch.Tensor) -> torch.Tensor:  # the input holds each voxel's coordinates
        starts.extend(tuple(int(v) for v in p[:, 0, 0, 0]) for p in patch)
        return torch.zeros(patch.shape[0], 2, *patch.shape[2:])

    size = (256, 312, 32)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij"))
    out = GaussianSlidingWindowInferer(roi_size=(96, 96, 32), sw_batch_size=4, overlap=0.5)(grid[None], record)
    assert out.shape == (1, 2, *size)
    assert sorted({s[0] for s in starts}) == [0, 40, 80, 120, 160]
    assert sorted({s[1] for s in starts}) == [0, 43, 86, 130, 173, 216]
    assert {s[2] for s in starts} == {0} and len(starts) == len(set(starts)) == 5 * 6
    plain: list[tuple[int, int, int]] = []
    SlidingWindowInferer(roi_size=(96, 96, 32), overlap=0.5)(grid[None], lambda p: plain.extend(
        tuple(int(v) for v in q[:, 0, 0, 0]) for q in p) or torch.zeros(p.shape[0], 2, *p.shape[2:]))
    assert sorted({s[0] for s in plain}) == [0, 48, 96, 144, 160]
    assert sorted({s[1] for s in plain}) == [0, 48, 96, 144, 192, 216]
    assert window_starts(240, 96) == [0, 48, 96, 144] and window_starts(96, 96) == window_starts(50, 96) == [0]
    assert window_starts(256, 96, step=1.0) == [0, 80, 160]
    with pytest.raises(ValueError, match="window step"):
        window_starts(256, 96, step=0.0)


def test_short_axes_are_padded_on_both_sides_and_cropped_off():
    """An axis shorter than the window is padded half below, half above (as nnU-Net pads), and the result is
    cropped back to the input's grid, keeping a MetaTensor's metadata; a network that resizes is refused."""
    from monai.data import MetaTensor

    seen: list[torch.Tensor] = []

    def record(patch: torch.Tensor) -> torch.Tensor:
        seen.append(patch)
        return patch.repeat(1, 2, 1, 1, 1)

    affine = torch.diag(torch.tensor([0.8, 0.8, 5.0, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.rand(1, 1, 20, 16, 5) + 1, affine=affine, meta={"filename_or_obj": "ct.nii.gz"})
    out = GaussianSlidingWindowInferer(roi_size=(20, 16, 8), cval=0.0)(image, record)
    assert len(seen) == 1 and seen[0].shape == (1, 1, 20, 16, 8)
    assert type(seen[0]) is torch.Tensor  # the network gets plain windows, the metadata stays with the volume
    # 3 voxels of padding: 1 below, 2 above, at cval; the image sits in between
    assert torch.all(seen[0][..., 0] == 0) and torch.all(seen[0][..., 6:] == 0)
    assert torch.equal(seen[0][..., 1:6], image.as_tensor())
    assert isinstance(out, MetaTensor) and out.shape == (1, 2, 20, 16, 5)
    assert torch.equal(out.affine, image.affine) and out.meta["filename_or_obj"] == "ct.nii.gz"
    torch.testing.assert_close(out.as_tensor(), image.as_tensor().repeat(1, 2, 1, 1, 1))
    with pytest.raises(ValueError, match="same size"):
        GaussianSlidingWindowInferer(roi_size=(20, 16, 8))(image, lambda x: x[..., :4])
    with pytest.raises(ValueError, match="does not fit"):
        GaussianSlidingWindowInferer(roi_size=(20, 16))(image, record)


def test_find_inputs_and_clashing_outputs(tmp_path):
    """Folders of volumes expand to their files, other folders are DICOM series; duplicate mask names are refused."""
    (tmp_path / "vols").mkdir()
    (tmp_path / "series").mkdir()
    for name in ("b.nii.gz", "a.nrrd"):
        (tmp_path / "vols" / name).write_bytes(b"")
    (tmp_path / "series" / "1.dcm").write_bytes(b"")
    found = find_inputs([tmp_path / "vols", str(tmp_path / "series")])
    assert found == [str(tmp_path / "vols" / "a.nrrd"), str(tmp_path / "vols" / "b.nii.gz"), str(tmp_path / "series")]
    with pytest.raises(FileNotFoundError):
        find_inputs(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match="holds no scan"):
        find_inputs(tmp_path)  # only sub-folders
    for parent in ("x", "y"):  # two DICOM series folders of the same name
        (tmp_path / parent / "case").mkdir(parents=True)
        (tmp_path / parent / "case" / "1.dcm").write_bytes(b"")
    with pytest.raises(ValueError, match="same mask file"):
        predict(BUNDLES / "ln_ct_dynunet", [tmp_path / "x" / "case", tmp_path / "y" / "case"], tmp_path / "o",
                checkpoint=tmp_path / "vols" / "b.nii.gz")  # fmt: skip
