"""MONAI dictionary transforms of the bundles: a model's own CT normalisation, and resampling as the model was trained."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import InvertibleTransform, MapTransform, ScaleIntensityRanged, Spacingd
from monai.utils import TraceKeys

from dgst_monai import resampling as nnunet_resampling
from dgst_monai.normalization import load_normalization

__all__ = ["RESAMPLING_RULES", "CheckpointNormalized", "ResampleAndNormalized"]

#: ``ResampleAndNormalized``'s rules: "monai", how the bundles train; "nnunet", nnU-Net v2's, for imported models
RESAMPLING_RULES = ("monai", "nnunet")


class CheckpointNormalized(MapTransform):
    """``ScaleIntensityRanged(clip=True)`` with the normalisation a checkpoint was trained with.

    The values come from ``normalization.json`` beside ``checkpoint`` (written by every training and fine-tuning
    run), read on the first call rather than at construction: an inference or evaluation config then builds (the
    model zoo's ``initialize()`` / ``check_properties()``, MONAI Label's parsing) before any weights exist, and
    a missing file is reported when the first scan is processed, naming the checkpoint.

    Args:
        keys: image keys to normalise.
        checkpoint: the checkpoint file (or its folder) whose ``normalization.json`` is used.
        allow_missing_keys: as in MONAI's ``MapTransform``.

    Example::

        Compose([LoadImaged("image"), EnsureChannelFirstd("image"),
                 CheckpointNormalized("image", checkpoint="models/model.pt")])
    """

    def __init__(
        self, keys: KeysCollection, checkpoint: str | os.PathLike[str], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checkpoint = checkpoint
        self._scale: ScaleIntensityRanged | None = None

    def _scaler(self) -> ScaleIntensityRanged:
        if self._scale is None:
            values = load_normalization(self.checkpoint)
            self._scale = ScaleIntensityRanged(self.keys, **values, clip=True, allow_missing_keys=self.allow_missing_keys)
        return self._scale

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self._scaler()(data)


class ResampleAndNormalized(MapTransform, InvertibleTransform):
    """Resample to the plan's spacing and normalise, in the order and with the interpolation the model was trained with.

    ``resampling="monai"`` is how the bundles train (``train.json``): ``Spacingd(mode="bilinear")``, then
    :class:`CheckpointNormalized`. ``"nnunet"`` is nnU-Net v2's default preprocessing, for models imported with
    :func:`~dgst_monai.networks.export_nnunet`: the normalisation first, then a cubic spline, in-plane only and
    nearest slice along a thick axis (:mod:`dgst_monai.resampling`). The inverse (MONAI's ``Invertd``, applied to
    the prediction) undoes the resampling only: ``Spacingd``'s for "monai"; for "nnunet", nnU-Net's export rule,
    linear in-plane and nearest slice along a thick axis. On the same weights, "nnunet" then gives nnU-Net's own
    masks on scans it resamples; on scans at the plan's spacing the two rules are the same.

    Args:
        keys: image keys (one channel-first image each, after ``Orientationd``).
        pixdim: the target spacing (mm), one per spatial axis.
        checkpoint: the checkpoint (or its folder) whose ``normalization.json`` is used.
        resampling: one of :data:`RESAMPLING_RULES`.
        allow_missing_keys: as in MONAI's ``MapTransform``.

    Example::

        Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", "RAS"),
                 ResampleAndNormalized("image", pixdim=(0.8, 0.8, 2.5), checkpoint="models/model.pt",
                                       resampling="nnunet")])
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixdim: Sequence[float],
        checkpoint: str | os.PathLike[str],
        resampling: str = "monai",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if resampling not in RESAMPLING_RULES:
            raise ValueError(f"resampling must be one of {', '.join(RESAMPLING_RULES)}, not {resampling!r}")
        self.resampling = resampling
        self.pixdim = tuple(float(p) for p in pixdim)
        self.normalize = CheckpointNormalized(keys, checkpoint, allow_missing_keys)
        self.spacing = Spacingd(keys, pixdim=self.pixdim, mode="bilinear", allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.resampling == "monai":
            return self.normalize(self.spacing(data))
        d = self.normalize(data)
        for key in self.key_iterator(d):
            d[key] = self._resample_nnunet(d[key])
        return d

    def _resample_nnunet(self, image: MetaTensor) -> MetaTensor:
        affine = image.affine.double()
        spacing = affine_to_spacing(affine, r=3).tolist()
        shape = tuple(image.shape[1:])
        new_shape = nnunet_resampling.resampled_shape(shape, spacing, self.pixdim)
        axis = nnunet_resampling.thick_axis(spacing, self.pixdim)
        array = nnunet_resampling.resample(image.numpy(), new_shape, axis, order=3)
        to_old = nnunet_resampling.voxel_map(new_shape, shape)
        out = MetaTensor(torch.from_numpy(array), meta=image.meta, applied_operations=image.applied_operations)
        meta = self.track_transform_meta(
            out, sp_size=new_shape, affine=torch.as_tensor(to_old, dtype=torch.float64),
            extra_info={"spacing": spacing, "thick_axis_back": nnunet_resampling.thick_axis(self.pixdim, spacing)},
            orig_size=shape, transform_info=self.get_transform_info(),
        )
        return out.copy_meta_from(meta)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.resampling == "monai":
            return self.spacing.inverse(data)
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            xform = self.pop_transform(image)
            orig_size = tuple(int(n) for n in xform[TraceKeys.ORIG_SIZE])
            axis = xform[TraceKeys.EXTRA_INFO]["thick_axis_back"]
            array = nnunet_resampling.resample(image.detach().cpu().numpy(), orig_size, axis, order=1)
            to_new = nnunet_resampling.voxel_map(orig_size, image.shape[1:])
            out = MetaTensor(torch.from_numpy(array), meta=image.meta, applied_operations=image.applied_operations)
            out.affine = image.affine.double() @ torch.as_tensor(to_new, dtype=torch.float64)
            d[key] = out
        return d
