"""MONAI dictionary transforms of the bundles: a model's own CT normalisation, read from beside its checkpoint."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRanged

from dgst_monai.normalization import load_normalization

__all__ = ["CheckpointNormalized"]


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
