"""Ignite handler for FSEFT's transductive size prior on the unlabeled target volumes of a few-shot run.

It keeps the lymph-node volume fraction predicted on those volumes within a margin of the fraction in the support
shots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import CacheDataset, DataLoader
from monai.engines.utils import IterationEvents
from monai.transforms import LoadImage
from torch import nn

from dgst_monai.bundle.config_values import flag
from dgst_monai.data.unlabeled import images_only, unlabeled_cases


class SizePriorHandler:
    """The transductive size prior of Silva-Rodriguez et al. (FSEFT), for any fine-tuning run.

    After the trainer's ``backward()`` (``IterationEvents.BACKWARD_COMPLETED``) and past ``warmup_iterations``,
    it draws ``num_crops`` crops of one unlabeled target volume, predicts them with the network being trained
    (in the trainer's autocast under AMP), and back-propagates into the same gradients, before the optimizer
    step, the penalty

        ``e = (target - predicted) / max(target, predicted)``,
        ``penalty = weight * (|e| - margin)`` when ``|e| > margin``, else 0,

    with FSEFT's ``weight`` 0.1 and ``margin`` 0.3 (the denominator is taken as a constant, as in FSEFT).

    What is measured:

    * ``target_fraction``: the foreground fraction of the support shots' label volumes (all foreground
      voxels of a whole label volume over its voxels, averaged over the shots; :func:`support_fraction`).
      FSEFT takes the size of the largest connected component, one organ; lymph nodes are many small
      components, so all of them count.
    * ``predicted``: the mean foreground probability (1 - softmax background) over the voxels of the crops
      that lie inside the volume. Crop corners are drawn uniformly from every position where the crop still
      overlaps the volume (:func:`uniform_crops`), so every voxel is equally likely to be seen and the
      expectation is the volume fraction, as on the support side. Crops hang over the borders with zero
      padding, which is not counted.
    * The unlabeled volumes: the target training cases that are not among the shots, images only, labels never
      read (:func:`dgst_monai.data.unlabeled.unlabeled_cases`), preprocessed like the training images
      (:func:`dgst_monai.data.unlabeled.images_only` of the bundle's preprocessing, no augmentation) and served
      one volume per batch; the handler cycles through them.

    Given ``cases``, ``shots`` and ``transform`` (a bundle's ``training_cases``, ``shot_cases`` and
    ``preprocessing``), the handler reads both when it is attached: the shots' label volumes for
    ``target_fraction`` and the non-shot images through a cached loader. A disabled handler (``enabled``
    false: the bundle's ``--size_prior false``) attaches nothing and reads no file. ``unlabeled`` and
    ``target_fraction`` give both ready-made instead.

    Each step past the warm-up costs one more forward and backward of ``num_crops`` patches (for the spatial
    adapter the backward stops at the adapter). Attach it **before** :class:`dgst_monai.FineTuningHandler`,
    which unscales (AMP), clips and masks the gradients at the same event: the penalty's gradient must be in
    them first. Attaching it after raises.

    Args:
        unlabeled: iterable of batches (a DataLoader with ``batch_size=1``) of whole preprocessed volumes,
            ``{image_key: (1, C, *spatial)}``; or None with ``cases``, ``shots`` and ``transform``.
        target_fraction: foreground fraction of the support shots, in (0, 1); or None with ``shots``.
        patch_size: crop size (the training patch size).
        num_crops: crops per step (one forward of this batch size).
        weight: lambda.
        margin: relative-error margin inside which there is no penalty.
        warmup_iterations: iterations without the prior at the start of the run.
        image_key: key of the image in the batches.
        seed: seed of the crop positions.
        network: the network to constrain; by default the engine's ``network``.
        cases: the target training cases (datalist entries), shots included.
        shots: the support shots among ``cases``.
        transform: the training preprocessing (no augmentation); run on the images only.
        reader: MONAI image reader of the shots' labels (:func:`support_fraction`).
        enabled: whether to apply the prior at all: a bool or a yes/no word (``"false"`` from a command line).

    Raises:
        ValueError: neither ``unlabeled`` with ``target_fraction`` nor ``cases``, ``shots`` and ``transform``
            given, a word that is not yes/no, or an invalid number.

    Example::

        shots = few_shot(training_cases, 5, seed=0)
        SizePriorHandler(patch_size=(96, 96, 64), cases=training_cases, shots=shots,
                         transform=preprocessing).attach(trainer)
        FineTuningHandler(method="spatial_adapter").attach(trainer)   # after the size prior
    """

    def __init__(
        self,
        unlabeled: Iterable[Mapping[str, Any]] | None = None,
        target_fraction: float | None = None,
        patch_size: Sequence[int] = (),
        num_crops: int = 2,
        weight: float = 0.1,
        margin: float = 0.3,
        warmup_iterations: int = 250,
        image_key: str = "image",
        seed: int = 0,
        network: nn.Module | None = None,
        *,
        cases: Sequence[Mapping[str, Any]] | None = None,
        shots: Sequence[Mapping[str, Any]] | None = None,
        transform: Callable[..., Any] | None = None,
        reader: Any = None,
        enabled: Any = True,
    ) -> None:
        ready = unlabeled is not None and target_fraction is not None
        from_cases = cases is not None and shots is not None and transform is not None
        if ready == from_cases:
            raise ValueError(
                "SizePriorHandler needs either unlabeled and target_fraction, or cases, shots and transform"
            )
        if target_fraction is not None and not 0.0 < float(target_fraction) < 1.0:
            raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")
        if not patch_size or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size must be positive, got {list(patch_size)}")
        if isinstance(num_crops, bool) or int(num_crops) < 1:
            raise ValueError(f"num_crops must be >= 1, got {num_crops}")
        if weight < 0 or margin < 0:
            raise ValueError(f"weight and margin must be >= 0, got {weight} and {margin}")
        if isinstance(warmup_iterations, bool) or int(warmup_iterations) < 0:
            raise ValueError(f"warmup_iterations must be >= 0, got {warmup_iterations}")
        self.enabled = flag(enabled, "size_prior")
        self.unlabeled = unlabeled
        self.target_fraction = None if target_fraction is None else float(target_fraction)
        self._cases, self._shots, self._transform, self._reader = cases, shots, transform, reader
        self.patch_size = tuple(int(p) for p in patch_size)
        self.num_crops = int(num_crops)
        self.weight = float(weight)
        self.margin = float(margin)
        self.warmup_iterations = int(warmup_iterations)
        self.image_key = image_key
        self.network = network
        self.generator = torch.Generator().manual_seed(int(seed))
        self.logger = logging.getLogger(__name__)
        self._volumes: Iterator[Mapping[str, Any]] | None = None
        #: penalty and predicted fraction of the last step (device tensors; read them rarely)
        self.last_penalty: torch.Tensor | None = None
        self.last_fraction: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        """Read the shots and the unlabeled images (when given as cases) and register on ``engine``'s
        ``BACKWARD_COMPLETED``; a disabled handler does neither.

        Raises:
            ValueError: a ``FineTuningHandler`` is already attached (it would clip and mask before the penalty),
                or the cases leave no unlabeled volume (see :func:`~dgst_monai.data.unlabeled.unlabeled_cases`)
                or no foreground in the shots.
        """
        from dgst_monai.handlers.fine_tuning import FineTuningHandler

        if not self.enabled:
            return
        # Ignite keeps (handler, args, kwargs) per event in registration order; it has no public listing
        registered = getattr(engine, "_event_handlers", {}).get(IterationEvents.BACKWARD_COMPLETED, [])
        if any(isinstance(entry[0], FineTuningHandler) for entry in registered):
            raise ValueError(
                "SizePriorHandler must be attached before FineTuningHandler (list it earlier in the trainer's "
                "handlers): FineTuningHandler unscales, clips and masks the gradients, which must include the size "
                "prior's"
            )
        if self.unlabeled is None:
            self._read_cases()
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log)

    def _read_cases(self) -> None:
        assert self._cases is not None and self._shots is not None and self._transform is not None
        self.target_fraction = support_fraction(self._shots, reader=self._reader)
        volumes = CacheDataset(
            unlabeled_cases(self._cases, self._shots), images_only(self._transform), cache_rate=1.0, num_workers=0
        )
        self.unlabeled = DataLoader(volumes, batch_size=1, shuffle=False, num_workers=0)

    def __call__(self, engine: Engine) -> None:
        """Past the warm-up: predict crops of the next unlabeled volume and back-propagate the penalty."""
        if engine.state.iteration <= self.warmup_iterations:
            return
        network = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        device = next(network.parameters()).device
        volume = self._next_volume()[self.image_key]
        # a MetaTensor's metadata would follow every crop and the penalty: plain tensors suffice here
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else torch.as_tensor(volume)
        if volume.dim() < 3 or volume.shape[0] != 1:
            raise ValueError(
                f"SizePriorHandler expects batches of one volume (1, C, *spatial), got shape {tuple(volume.shape)}"
            )
        crops, valid = uniform_crops(volume[0], self.patch_size, self.num_crops, self.generator)
        crops, valid = crops.to(device), valid.to(device)
        amp = bool(getattr(engine, "amp", False))
        with torch.autocast(device.type, enabled=amp, **(getattr(engine, "amp_kwargs", None) or {})):
            logits = network(crops)
        if logits.dim() == crops.dim() + 1:  # stacked deep-supervision heads: the main output is the first
            logits = logits[:, 0]
        foreground = 1.0 - torch.softmax(logits.float(), dim=1)[:, :1]
        predicted = (foreground * valid).sum() / valid.sum()
        assert self.target_fraction is not None  # given, or read on attach
        penalty = size_penalty(predicted, self.target_fraction, self.weight, self.margin)
        scaler = getattr(engine, "scaler", None)
        # a penalty inside the margin is an exact zero with zero gradient: no host sync to skip it
        (scaler.scale(penalty) if amp and scaler is not None else penalty).backward()
        self.last_penalty, self.last_fraction = penalty.detach(), predicted.detach()

    def _next_volume(self) -> Mapping[str, Any]:
        assert self.unlabeled is not None  # given, or built on attach
        if self._volumes is not None:
            batch = next(self._volumes, None)
            if batch is not None:
                return batch
        self._volumes = iter(self.unlabeled)
        batch = next(self._volumes, None)
        if batch is None:
            raise ValueError("SizePriorHandler: the unlabeled loader yields no volume")
        return batch

    def _log(self, engine: Engine) -> None:
        if self.last_fraction is None or self.last_penalty is None:
            return
        fraction, penalty = float(self.last_fraction), float(self.last_penalty)
        engine.state.metrics["size_prior_fraction"] = fraction
        engine.state.metrics["size_prior_penalty"] = penalty
        self.logger.info(
            f"size prior: predicted foreground fraction {fraction:.5f} (target {self.target_fraction:.5f}), "
            f"penalty {penalty:.5f}"
        )


def size_penalty(predicted: torch.Tensor, target: float, weight: float = 0.1, margin: float = 0.3) -> torch.Tensor:
    """FSEFT's proportion penalty: ``weight * max(|e| - margin, 0)``, ``e = (target - predicted) / max(both)``.

    The denominator is a constant (no gradient), so the gradient is that of ``|target - predicted|`` scaled.

    Example::

        size_penalty(torch.tensor(0.2), 0.1)   # e = -0.5: 0.1 * (0.5 - 0.3) = 0.02
    """
    scale = torch.clamp(predicted.detach(), min=target)
    error = (target - predicted) / scale
    return weight * torch.relu(error.abs() - margin)


def uniform_crops(
    volume: torch.Tensor, patch_size: Sequence[int], num_crops: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_crops`` crops of ``volume`` placed so that every voxel is equally likely to be covered.

    Along an axis of size ``D`` with patch ``P``, the crop starts at a uniform integer in ``[-(P-1), D-1]``:
    every voxel is inside exactly ``P`` of those ``D + P - 1`` positions. The part of a crop outside the volume
    is zero; ``valid`` marks the voxels inside.

    Args:
        volume: ``(C, *spatial)``.
        patch_size: crop size, one per spatial axis.
        num_crops: number of crops.
        generator: random generator of the positions (CPU).

    Returns:
        ``(crops, valid)``: ``(num_crops, C, *patch_size)`` and ``(num_crops, 1, *patch_size)`` (float 0/1).

    Example::

        crops, valid = uniform_crops(torch.rand(1, 40, 40, 20), (32, 32, 16), num_crops=2)
    """
    shape = volume.shape[1:]
    if len(shape) != len(patch_size):
        raise ValueError(f"patch_size {list(patch_size)} does not match a volume of spatial shape {list(shape)}")
    crops, valid = [], []
    for _ in range(num_crops):
        starts = [
            int(torch.randint(-(p - 1), d, (1,), generator=generator)) for d, p in zip(shape, patch_size)
        ]
        crop, inside = crop_at(volume, starts, patch_size)
        crops.append(crop)
        valid.append(inside)
    return torch.stack(crops), torch.stack(valid)


def crop_at(
    volume: torch.Tensor, starts: Sequence[int], patch_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crop of ``volume`` (``(C, *spatial)``) whose corner is at ``starts`` (may be negative or overhang),
    zero outside the volume, and its ``(1, *patch_size)`` mask of voxels inside.

    Example::

        crop, inside = crop_at(torch.ones(1, 4, 4, 4), starts=(-2, 0, 2), patch_size=(4, 4, 4))
        int(inside.sum())   # 2 * 4 * 2 = 16
    """
    crop = volume.new_zeros((volume.shape[0], *patch_size))
    inside = torch.zeros((1, *patch_size), dtype=volume.dtype if volume.is_floating_point() else torch.float32)
    source, target = [], []
    for start, size, p in zip(starts, volume.shape[1:], patch_size):
        lo, hi = max(start, 0), min(start + p, size)
        if hi <= lo:  # no overlap along this axis: an empty crop
            return crop, inside
        source.append(slice(lo, hi))
        target.append(slice(lo - start, hi - start))
    crop[(slice(None), *target)] = volume[(slice(None), *source)]
    inside[(slice(None), *target)] = 1
    return crop, inside


def support_fraction(cases: Iterable[Mapping[str, Any]], label_key: str = "label", reader: Any = None) -> float:
    """Foreground fraction of the support shots: per shot, nonzero voxels of the whole label volume over its
    voxels, averaged over the shots (each volume counts once, as each unlabeled volume does in the prior).

    The label files are read as they are (no resampling: a volume fraction does not depend on the grid).

    Args:
        cases: the shots' datalist entries.
        label_key: key of the label path.
        reader: MONAI image reader (name or instance) for ``LoadImage``; default MONAI's choice by extension.

    Raises:
        ValueError: no shots, a shot without a label, or support labels without any foreground.

    Example::

        target = support_fraction(few_shot(training_cases, 5, seed=0))
    """
    load = LoadImage(image_only=True, reader=reader)
    fractions = []
    for i, case in enumerate(cases):
        if label_key not in case:
            raise ValueError(
                f"support case {case.get('case_id', i)!r} has no {label_key!r} to measure the size prior on"
            )
        label = torch.as_tensor(load(case[label_key]))
        fractions.append(float((label > 0).sum()) / label.numel())
    if not fractions:
        raise ValueError("support_fraction needs at least one support case")
    if not any(fractions):
        raise ValueError("the support labels have no foreground: the size prior's target fraction would be 0")
    return sum(fractions) / len(fractions)
