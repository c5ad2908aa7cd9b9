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
from dgst_monai.normalization import checked_normalization, load_normalization

__all__ = ["RESAMPLING_RULES", "CTNormalized", "CheckpointNormalized", "ResampleAndNormalized", "SaveDicomd"]

#: ``ResampleAndNormalized``'s rules: "monai", how the bundles train; "nnunet", nnU-Net v2's, for imported models
RESAMPLING_RULES = ("monai", "nnunet")


class CTNormalized(ScaleIntensityRanged):
    """``ScaleIntensityRanged(clip=True)`` given its four values as one dict, as the bundles hold a CT
    normalisation (``intensity``: the datalist's, the foundation's ``normalization.json``, or the shots').

    ``train.json``'s ``normalizer``: training knows its values before it starts. Evaluation and inference
    normalise with the evaluated checkpoint's own values, through :class:`CheckpointNormalized`.

    Args:
        keys: image keys to normalise.
        intensity: ``{"a_min", "a_max", "b_min", "b_max"}``
            (:func:`dgst_monai.normalization.scale_intensity_range`).
        allow_missing_keys: as in MONAI's ``MapTransform``.

    Raises:
        ValueError: a value missing or implausible, naming it.

    Example::

        "normalizer": {"_target_": "dgst_monai.transforms.CTNormalized", "keys": "image", "intensity": "@intensity"}
    """

    def __init__(self, keys: KeysCollection, intensity: Mapping[str, float], allow_missing_keys: bool = False) -> None:
        values = checked_normalization(intensity, "intensity")
        super().__init__(keys, **values, clip=True, allow_missing_keys=allow_missing_keys)


class CheckpointNormalized(MapTransform):
    """``ScaleIntensityRanged(clip=True)`` with the normalisation a checkpoint was trained with.

    The one way evaluation and inference normalise a scan: ``evaluate.json``'s ``normalizer`` is this transform,
    and ``inference.json``'s :class:`ResampleAndNormalized` (which ``dgst-monai predict`` and the MONAI Label app
    run) applies it, so both give the same input to the network. The values come from ``normalization.json``
    beside ``checkpoint`` (written by every training and fine-tuning run), read on the first call rather than at
    construction: an inference or evaluation config then builds (the model zoo's ``initialize()`` /
    ``check_properties()``, MONAI Label's parsing) before any weights exist, and a missing file is reported when
    the first scan is processed, naming the checkpoint.

    Args:
        keys: image keys to normalise.
        checkpoint: the checkpoint file (or its folder) whose ``normalization.json`` is used.
        allow_missing_keys: as in MONAI's ``MapTransform``.

    Example::

        "normalizer": {"_target_": "dgst_monai.transforms.CheckpointNormalized", "keys": "image",
                       "checkpoint": "@checkpoint"}
    """

    def __init__(
        self, keys: KeysCollection, checkpoint: str | os.PathLike[str], allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checkpoint = checkpoint
        self._scale: CTNormalized | None = None

    def _scaler(self) -> CTNormalized:
        if self._scale is None:
            self._scale = CTNormalized(self.keys, load_normalization(self.checkpoint), self.allow_missing_keys)
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


class SaveDicomd(MapTransform):
    """Write a predicted mask back as DICOM-SEG and / or RTSTRUCT on the DICOM series it was predicted from.

    Placed after ``SaveImaged`` in an inference config's postprocessing: the mask (channel-first, on the input's
    grid after ``Invertd``) is mapped onto the source series (its ``filename_or_obj``, a DICOM series folder)
    without resampling and written with :func:`dgst_monai.dicom.writers.mask_to_dicom` as
    ``<case>_<postfix>_seg.dcm`` / ``<case>_<postfix>_rtstruct.dcm``. Formats other than DICOM ones (``nifti``,
    which ``SaveImaged`` writes) are ignored here, so the bundle's one ``output_format`` setting drives both.

    Args:
        keys: the prediction key.
        output_dir: folder to write into.
        output_format: ``nifti``, ``dicom-seg``, ``rtstruct``, comma-separated or a list.
        output_postfix: as ``SaveImaged``'s.
        roi_name: RTSTRUCT ROI name.

    Example::

        {"_target_": "dgst_monai.transforms.SaveDicomd", "keys": "pred", "output_dir": "@output_dir",
         "output_format": "dicom-seg,rtstruct"}
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike[str],
        output_format: str | Sequence[str] = "nifti",
        output_postfix: str = "lymph_nodes",
        roi_name: str = "Lymph nodes",
        allow_missing_keys: bool = False,
    ) -> None:
        from dgst_monai.bundle.config_values import output_formats
        from dgst_monai.dicom.writers import DICOM_FORMATS

        super().__init__(keys, allow_missing_keys)
        self.formats = tuple(f for f in output_formats(output_format) if f in DICOM_FORMATS)
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.roi_name = roi_name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not self.formats:
            return d
        from dgst_monai.dicom.writers import mask_to_dicom
        from dgst_monai.predict import output_stem

        for key in self.key_iterator(d):
            pred = d[key]
            source = pred.meta.get("filename_or_obj") if isinstance(pred, MetaTensor) else None
            if not source or not os.path.isdir(str(source)):
                raise ValueError(f"{self.formats} output needs a DICOM series folder as input, got {source!r}")
            stem = output_stem(source, self.output_postfix)
            mask_to_dicom(
                mask_image(pred), str(source), self.output_dir, self.formats, roi_name=self.roi_name, stem=stem
            )
        return d


def mask_image(pred: MetaTensor) -> Any:
    """A channel-first MetaTensor mask with a RAS affine as a SimpleITK image in LPS (what DICOM writers take)."""
    import numpy as np
    import SimpleITK as sitk

    array = np.asarray(pred.detach().cpu())[0].astype(np.uint8)  # (x, y, z)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(pred.affine, dtype=np.float64)  # RAS -> LPS
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in affine[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (affine[:3, :3] / spacing).ravel()))
    return image
