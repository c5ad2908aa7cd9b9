"""The training record: what a training or fine-tuning run was, written beside its checkpoint.

``training_record.json`` holds the network plan, the method (None for pre-training), shots, seed, case ids, data
and schedule of the run. The bundles' ``run`` list writes it after training (:func:`save_training_record`);
``dgst-monai export`` reads it (:func:`load_training_record`) to write the exported bundle's network and
changelog.

Example::

    from dgst_monai.bundle.record import load_training_record

    record = load_training_record("tuned/model.pt")  # {"method": "dgst", "shots": 5, ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_write_json, read_json

__all__ = ["RECORD_FILE", "load_training_record", "save_training_record"]

#: The record of a training run, beside its checkpoint.
RECORD_FILE = "training_record.json"


def _record_value(key: str, value: Any) -> Any:
    """JSON form of one record entry: a plan by its ``to_config()``, datalist entries by their case ids."""
    from dgst_monai.data.cases import case_id_of

    if hasattr(value, "to_config"):
        return value.to_config()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        return [case_id_of(entry, i) for i, entry in enumerate(value)]  # ids, not the paths of the scans
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise TypeError(f"training record: {key}={value!r} is not JSON data (numbers, strings, lists, dicts)") from None
    return value


def save_training_record(ckpt_dir: str | os.PathLike[str], record: Mapping[str, Any]) -> str:
    """Write what a training run was (network plan, method, shots, data, schedule) beside its checkpoint.

    :func:`dgst_monai.bundle.export.export_bundle` reads it to write the exported bundle's network and changelog.
    A plan (anything with ``to_config()``) is stored as its config, a list of datalist entries as their case ids;
    every other value must be JSON data. Under torch.distributed only rank 0 writes.

    Args:
        ckpt_dir: the run's checkpoint folder (``@ckpt_dir``); ``training_record.json`` is written there.
        record: the entries, e.g. from the bundle's ``training_record`` config item: ``plan``, ``method``
            (None for pre-training), ``shots``, ``seed``, ``cases``, ``datalist``, ``max_epochs``, ...

    Returns:
        The file's path.

    Raises:
        TypeError: an entry that is not JSON data.

    Example::

        # last entry of a bundle's "run" list
        {"_target_": "dgst_monai.bundle.record.save_training_record", "ckpt_dir": "@ckpt_dir", "record": "@training_record"}
    """
    import torch.distributed as dist

    from dgst_monai import __version__

    content = {"written_by": f"dgst-monai {__version__}"}
    content.update({str(k): _record_value(str(k), v) for k, v in record.items()})
    path = Path(ckpt_dir) / RECORD_FILE
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return str(path)
    atomic_write_json(path, content, allow_nan=False)
    return str(path)


def load_training_record(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The training record beside ``checkpoint`` (a file or its folder), or None if there is none.

    Raises:
        ValueError: the record is not a JSON object.

    Example::

        record = load_training_record("tuned/model.pt")  # {"method": "dgst", "shots": 5, ...}
    """
    ckpt = Path(checkpoint)
    path = (ckpt if ckpt.is_dir() else ckpt.parent) / RECORD_FILE
    if not path.is_file():
        return None
    content = read_json(path, "training record")
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object (the record save_training_record writes)")
    return content

