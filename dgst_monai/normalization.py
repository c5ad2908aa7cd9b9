"""The CT intensity normalisation a model was trained with: computed once, stored beside its checkpoint.

nnU-Net's CT normalisation clips the image to the 0.5 / 99.5 percentiles of the foreground (the voxels inside
the labels) and z-scores it with the foreground mean and std. That is one clipped linear map, which MONAI's
``ScaleIntensityRanged(clip=True)`` does with ``a_min``, ``a_max``, ``b_min``, ``b_max``
(:func:`scale_intensity_range`). Its four statistics (``intensity_properties``) come from one of:

* a datalist's ``intensity_properties`` (:func:`dgst_monai.data.datalists.ct_normalization`), written by
  ``dgst-monai data index`` / ``data synth`` over the training cases;
* exactly the given cases, e.g. the k shots of a fine-tune (:func:`normalization_from_cases`): no other
  case's file is opened;
* an nnU-Net v2 model's ``plans.json`` (:func:`normalization_from_nnunet_plans`).

Both computed paths share :func:`foreground_sample` and :func:`intensity_properties_of`. A training run
writes the arguments it used to ``normalization.json`` in its checkpoint folder (:func:`save_normalization`),
and evaluation and inference read them from beside the checkpoint (:func:`load_normalization`), both through
one transform, :class:`dgst_monai.transforms.CheckpointNormalized`.

Example:
    >>> from dgst_monai.normalization import scale_intensity_range
    >>> scale_intensity_range({"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 40.0, "std": 60.0})
    {'a_min': -100.0, 'a_max': 300.0, 'b_min': -2.3333333333333335, 'b_max': 4.333333333333333}
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dgst_monai.data.cases import case_id_of
from dgst_monai.files import atomic_write_json, read_json

__all__ = [
    "DEFAULT_SAMPLES_PER_CASE",
    "FINE_TUNING_SOURCES",
    "INTENSITY_STATISTICS",
    "NORMALIZATION_FILE",
    "checked_normalization",
    "fine_tuning_normalization",
    "foreground_sample",
    "intensity_properties",
    "intensity_properties_of",
    "load_normalization",
    "normalization_from_cases",
    "normalization_from_nnunet_plans",
    "save_normalization",
    "scale_intensity_range",
]

NORMALIZATION_FILE = "normalization.json"
#: The foreground statistics of nnU-Net's CT fingerprint, as its plans and our datalists name them.
INTENSITY_STATISTICS: tuple[str, ...] = ("percentile_00_5", "percentile_99_5", "mean", "std")
#: Foreground voxels sampled per case (nnU-Net samples too: fast and memory-flat on large cohorts).
DEFAULT_SAMPLES_PER_CASE = 10_000
_KEYS = ("a_min", "a_max", "b_min", "b_max")


# ------------------------------------------------------------------------------------------ statistics


def foreground_sample(
    image: np.ndarray,
    label: np.ndarray,
    case_id: str,
    samples_per_case: int | None = DEFAULT_SAMPLES_PER_CASE,
    seed: int = 0,
) -> np.ndarray:
    """The finite image values inside the label (``label > 0``) of one case, at most ``samples_per_case`` of
    them, drawn with a generator seeded by ``seed`` and the case id.

    Seeding by case id (not by position) makes a case contribute the same voxels whichever cases it is pooled
    with and in whatever order; the draw is from the sorted values, so it does not depend on how a reader
    orders the axes either (the phantom writer and ``data index`` get the same sample).

    Args:
        image: the CT in HU.
        label: the label volume, same shape.
        case_id: the case's id.
        samples_per_case: the sample size (None: every foreground voxel).
        seed: sampling seed.

    Returns:
        float64 values (empty if the label is empty).

    Raises:
        ValueError: the shapes differ.

    Example::

        values = foreground_sample(ct, mask, "hn_0003")
    """
    if image.shape != label.shape:
        raise ValueError(f"case {case_id}: image shape {image.shape} differs from label shape {label.shape}")
    values = np.asarray(image[label > 0], dtype=np.float64)
    # sorted: the sample then depends on the values only, not on the array's axis order (a reader's layout)
    values = np.sort(values[np.isfinite(values)])
    if samples_per_case is not None and values.size > samples_per_case:
        digest = int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "little")
        values = np.random.default_rng([int(seed), digest]).choice(values, int(samples_per_case), replace=False)
    return values


def intensity_properties_of(samples: Iterable[np.ndarray]) -> dict[str, float] | None:
    """nnU-Net's CT fingerprint of pooled foreground values: percentiles 0.5 / 99.5, mean and std (ddof 0).

    Args:
        samples: per-case foreground values (:func:`foreground_sample`).

    Returns:
        ``{"percentile_00_5", "percentile_99_5", "mean", "std"}``, or None when there is no foreground voxel
        at all: datalists store that as ``null``, and :func:`scale_intensity_range` refuses it.

    Example::

        props = intensity_properties_of(foreground_sample(ct, mask, cid) for cid, ct, mask in cases)
    """
    pooled = [np.asarray(s, dtype=np.float64).ravel() for s in samples]
    values = np.concatenate(pooled) if pooled else np.zeros(0)
    if values.size == 0:
        return None
    return {
        "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


def scale_intensity_range(
    properties: Mapping[str, Any] | None, source: str = "intensity properties"
) -> dict[str, float]:
    """``ScaleIntensityRanged`` arguments doing nnU-Net's CT normalisation with these foreground statistics.

    Args:
        properties: ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std`` (other keys are ignored).
        source: where they come from, for error messages.

    Returns:
        ``{"a_min", "a_max", "b_min", "b_max"}``: clip to the percentiles, subtract the mean, divide by the std.

    Raises:
        ValueError: no statistics (an empty foreground), missing keys, or implausible values.

    Example::

        transform = ScaleIntensityRanged("image", **scale_intensity_range(props), clip=True)
    """
    if properties is None:
        raise ValueError(
            f"{source}: no foreground statistics (the labels hold no foreground voxel), so the CT normalisation "
            "is undefined; label at least one lymph node in the cases used"
        )
    missing = [k for k in INTENSITY_STATISTICS if properties.get(k) is None]
    if missing:
        raise ValueError(f"{source}: intensity statistics lack {missing}; expected {INTENSITY_STATISTICS}")
    lo, hi, mean, std = (float(properties[k]) for k in INTENSITY_STATISTICS)
    if not all(math.isfinite(v) for v in (lo, hi, mean, std)) or not (hi > lo and std > 0):
        raise ValueError(f"{source}: implausible intensity statistics {dict(properties)}")
    return {"a_min": lo, "a_max": hi, "b_min": (lo - mean) / std, "b_max": (hi - mean) / std}


def normalization_from_cases(
    cases: Sequence[Mapping[str, Any]],
    base_dir: str | os.PathLike[str] | None = None,
    samples_per_case: int | None = DEFAULT_SAMPLES_PER_CASE,
    seed: int = 0,
) -> dict[str, float]:
    """The CT normalisation estimated from exactly ``cases``, e.g. the k shots of a fine-tune.

    Only these cases' image and label files are read. The statistics are those ``dgst-monai data index``
    writes for a datalist's training cases (same sampling), so over the same cases both paths agree.

    Args:
        cases: datalist entries with ``image`` and ``label`` paths (and ``case_id``), e.g. from
            :func:`dgst_monai.data.datalists.few_shot`.
        base_dir: folder that relative paths are relative to (default: the working directory).
        samples_per_case: foreground voxels sampled per case (None: all).
        seed: sampling seed.

    Returns:
        ``ScaleIntensityRanged`` arguments (``a_min``, ``a_max``, ``b_min``, ``b_max``).

    Raises:
        ValueError: no case, or no labelled voxel in any of them.

    Example::

        shots = dgst_monai.data.datalists.few_shot(training_cases, shots=1, seed=0)
        intensity = normalization_from_cases(shots)
    """
    if not cases:
        raise ValueError("normalization_from_cases needs at least one case with an image and a label")
    props = intensity_properties(cases, base_dir=base_dir, samples_per_case=samples_per_case, seed=seed)
    ids = [case_id_of(c, i) for i, c in enumerate(cases)]
    return scale_intensity_range(props, f"cases {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")


#: ``fine_tuning_normalization``'s sources: the foundation's own normalisation, or one estimated from the shots.
FINE_TUNING_SOURCES = ("foundation", "shots")


def fine_tuning_normalization(
    source: str, checkpoint: str | os.PathLike[str], shots: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """The CT normalisation of a fine-tune (the fine-tuning config's ``normalization`` setting).

    ``"foundation"`` keeps the one the foundation was trained with (``normalization.json`` beside
    ``checkpoint``): the fine-tuned weights expect the intensities they were pre-trained on. ``"shots"``
    re-estimates it from the shots' images and labels only (:func:`normalization_from_cases`).

    Raises:
        ValueError: any other ``source``, before anything is read.

    Example::

        "intensity": {"_target_": "dgst_monai.normalization.fine_tuning_normalization", "source": "@normalization",
                      "checkpoint": "@foundation_checkpoint", "shots": "@shot_cases"}
    """
    if source == "foundation":
        return load_normalization(checkpoint)
    if source == "shots":
        return normalization_from_cases(shots)
    raise ValueError(f"normalization must be one of {', '.join(FINE_TUNING_SOURCES)}, got {source!r}")


def normalization_from_nnunet_plans(plans: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, float]:
    """The CT normalisation of an nnU-Net v2 model: its plans' ``foreground_intensity_properties_per_channel``.

    Args:
        plans: the plans (a dict) or the path of ``plans.json``.

    Returns:
        ``ScaleIntensityRanged`` arguments for channel 0.

    Raises:
        FileNotFoundError: no such plans file.
        ValueError: not JSON, or no channel-0 foreground intensity properties.

    Example::

        intensity = normalization_from_nnunet_plans("nnUNet_results/Dataset001_LN/.../plans.json")
    """
    source = "nnU-Net plans"
    if not isinstance(plans, Mapping):
        source = f"nnU-Net plans {plans}"
        plans = read_json(plans, "nnU-Net plans")
    per_channel = plans.get("foreground_intensity_properties_per_channel") if isinstance(plans, Mapping) else None
    channel = per_channel.get("0") if isinstance(per_channel, Mapping) else None
    if not isinstance(channel, Mapping):
        raise ValueError(
            f"{source}: no foreground_intensity_properties_per_channel['0'] (is it an nnU-Net v2 plans file?)"
        )
    return scale_intensity_range(channel, f"{source}, foreground_intensity_properties_per_channel['0']")


# ------------------------------------------------------------------------------------------ files


def checked_normalization(values: Mapping[str, Any], source: str = "normalisation") -> dict[str, float]:
    """``values`` as the four ``ScaleIntensityRanged`` floats ``a_min``, ``a_max``, ``b_min``, ``b_max``, checked.

    Raises:
        ValueError: a key missing, a value that is not finite, or ``a_max <= a_min``; the message names ``source``.
    """
    missing = [k for k in _KEYS if k not in values]
    if missing:
        raise ValueError(f"{source}: normalisation lacks {missing}; expected the ScaleIntensityRanged keys {_KEYS}")
    out = {k: float(values[k]) for k in _KEYS}
    if not all(math.isfinite(v) for v in out.values()) or out["a_max"] <= out["a_min"]:
        raise ValueError(f"{source}: implausible normalisation {out}")
    return out


def save_normalization(folder: str | os.PathLike[str], intensity: Mapping[str, float]) -> str:
    """Write ``intensity`` (``a_min``, ``a_max``, ``b_min``, ``b_max``) to ``<folder>/normalization.json``.

    The file is replaced atomically; under torch.distributed only rank 0 writes.

    Args:
        folder: the checkpoint folder (created if missing).
        intensity: the ``ScaleIntensityRanged`` arguments used in training.

    Returns:
        The file's path.

    Raises:
        ValueError: missing keys or implausible values.

    Example::

        save_normalization("models", normalization_from_cases(shots))
    """
    import torch.distributed as dist

    values = checked_normalization(intensity, "save_normalization")
    path = Path(folder) / NORMALIZATION_FILE
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return str(path)
    atomic_write_json(path, values)
    return str(path)


def load_normalization(checkpoint: str | os.PathLike[str]) -> dict[str, float]:
    """The normalisation stored beside ``checkpoint`` (a checkpoint file, or its folder).

    Args:
        checkpoint: e.g. ``models/model.pt``; ``models/normalization.json`` is read.

    Returns:
        ``{"a_min", "a_max", "b_min", "b_max"}`` for ``ScaleIntensityRanged``.

    Raises:
        FileNotFoundError: no ``normalization.json`` beside the checkpoint (the message says how to supply one).
        ValueError: the file is not valid.

    Example::

        intensity = load_normalization("models/model.pt")
    """
    ckpt = Path(checkpoint)
    path = (ckpt if ckpt.is_dir() else ckpt.parent) / NORMALIZATION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the intensity normalisation of the model in {ckpt} is unknown. Training writes it "
            "beside model.pt; for other weights write it there from their training set's statistics: python -c "
            "\"from dgst_monai.data.datalists import ct_normalization; from dgst_monai.normalization import "
            f"save_normalization; save_normalization('{path.parent}', ct_normalization('<training datalist.json>'))\""
        )
    values = read_json(path, "normalization file")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {_KEYS}")
    return checked_normalization(values, str(path))


def intensity_properties(
    cases: Sequence[Any],
    base_dir: str | os.PathLike[str] | None = None,
    samples_per_case: int | None = DEFAULT_SAMPLES_PER_CASE,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float] | None:
    """nnU-Net's CT fingerprint over ``cases``: percentiles 0.5 / 99.5, mean and std of labelled voxels.

    Reads the image and label of exactly these cases; the statistics are
    :func:`intensity_properties_of` of each case's :func:`foreground_sample`.

    Args:
        cases: datalist entries (``image`` / ``label`` paths, relative ones resolved against ``base_dir``) or
            objects with ``case_id``, ``image`` and ``label`` attributes (:class:`dgst_monai.data.index.FoundCase`).
        base_dir: folder that relative paths are relative to.
        samples_per_case: at most this many foreground voxels per case, drawn with a generator seeded by
            ``seed`` and the case id (None: all of them).
        seed: sampling seed.
        progress: called with one line per case (e.g. ``print``).

    Returns:
        The four statistics, or None when no case has a labelled voxel.

    Raises:
        ValueError: an image and its label differ in size (run ``dgst-monai data check`` first).

    Example::

        props = intensity_properties(load_split("datalist.json", "training"))
    """
    import SimpleITK as sitk

    from dgst_monai.data.readers import read_image  # reads images: SimpleITK only when used

    base = Path(base_dir) if base_dir is not None else Path.cwd()
    samples = []
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping):
            cid, image_path, label_path = case.case_id, case.image, case.label
        else:
            cid = case_id_of(case, i)
            image_path, label_path = base / case["image"], base / case["label"]
        image = sitk.GetArrayFromImage(read_image(image_path))
        label = sitk.GetArrayFromImage(read_image(label_path))
        if image.shape != label.shape:
            raise ValueError(
                f"case {cid}: image {image_path} has shape {image.shape[::-1]} but label {label_path} has "
                f"{label.shape[::-1]}; run `dgst-monai data check` on the datalist"
            )
        samples.append(foreground_sample(image, label, cid, samples_per_case, seed))
        if progress is not None:
            progress(f"  intensity: {cid} ({samples[-1].size} foreground voxels sampled)")
    return intensity_properties_of(samples)
