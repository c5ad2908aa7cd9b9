"""The CT intensity normalisation a model was trained with, stored beside its checkpoint.

Training normalises CT with statistics of its datalist (:func:`dgst_monai.data.datalists.ct_normalization`);
inference has no datalist, so the training run writes the ``ScaleIntensityRanged`` arguments it used to
``normalization.json`` in its checkpoint folder and the inference config reads them from beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as dist

__all__ = ["NORMALIZATION_FILE", "load_normalization", "save_normalization"]

NORMALIZATION_FILE = "normalization.json"
_KEYS = ("a_min", "a_max", "b_min", "b_max")


def _check(values: Mapping[str, float], source: str) -> dict[str, float]:
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
    """
    values = _check(intensity, "save_normalization")
    path = Path(folder) / NORMALIZATION_FILE
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(values, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
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
    """
    ckpt = Path(checkpoint)
    path = (ckpt if ckpt.is_dir() else ckpt.parent) / NORMALIZATION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the intensity normalisation of the model in {ckpt} is unknown. Training writes it "
            "beside model.pt; for other weights override `intensity` with the training set's values, e.g. "
            "--intensity \"$dgst_monai.data.datalists.ct_normalization('<training datalist.json>')\""
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {_KEYS}")
    return _check(values, str(path))
