"""Dataset cards (``data_manifests/*.json``): where each cohort comes from, its layout, label and split policy.

A card is a JSON object; :func:`load_manifest` reads one by name (``segrap2023``, ``lnq2023``, ``radcure``,
``synthetic``) or path and checks it with :func:`validate_manifest`, which names the file and the field of the
first problem. The cards are the repository's ``data_manifests/``, shipped with the package (found as
:func:`dgst_monai.bundle.resources.shipped_dir` says); set ``DGST_MONAI_MANIFESTS`` to read them from elsewhere.

Example:
    >>> from dgst_monai.data.manifests import load_manifest
    >>> card = load_manifest("segrap2023")
    >>> card["split_policy"]["few_shot"]["shots"]
    [3, 5, 10]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dgst_monai.bundle.resources import shipped_dir

__all__ = ["ManifestError", "list_manifests", "load_manifest", "manifest_dir", "validate_manifest"]

#: Required fields: dotted path -> expected type(s).
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "name": str,
    "title": str,
    "role": str,
    "source": dict,
    "source.url": str,
    "source.citation": str,
    "source.licence": str,
    "source.access": str,
    "modality": str,
    "file_format": str,
    "layout": dict,
    "layout.description": str,
    "layout.tree": list,
    "label": dict,
    "label.target": str,
    "label.derivation": str,
    "label.values": dict,
    "label.verified": bool,
    "cases": dict,
    "cases.expected": int,
    "spacing_notes": str,
    "index": dict,
    "index.dataset": str,
    "index.defaults": dict,
    "index.unsupported": list,
    "split_policy": dict,
    "split_policy.train_test": dict,
    "split_policy.train_test.test_fraction": (int, float),
    "split_policy.train_test.seed": int,
    "split_policy.few_shot": dict,
    "split_policy.few_shot.shots": list,
    "split_policy.few_shot.seeds": list,
    "split_policy.few_shot.nested": bool,
    "split_policy.source": str,
    "unverified": list,
}


class ManifestError(ValueError):
    """A dataset card is missing, not JSON, or lacks / mistypes a field."""


def manifest_dir() -> Path:
    """The folder of the cards: ``$DGST_MONAI_MANIFESTS``, else the shipped ``data_manifests/``."""
    env = os.environ.get("DGST_MONAI_MANIFESTS")
    return Path(env) if env else shipped_dir("data_manifests")


def list_manifests() -> list[str]:
    """Names of the available cards (file stems), sorted."""
    folder = manifest_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_manifest(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a dataset card.

    Args:
        name_or_path: a card name (``segrap2023``) or the path of a JSON file.

    Raises:
        ManifestError: no such card, invalid JSON or an invalid field (the message names file and field).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = manifest_dir() / f"{name_or_path}.json"
    if not path.is_file():
        raise ManifestError(
            f"dataset card {path} does not exist; available in {manifest_dir()}: "
            f"{', '.join(list_manifests()) or 'none'}"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ManifestError(f"dataset card {path} is not valid JSON: {err}") from None
    validate_manifest(card, source=str(path))
    return card


def _get(card: dict[str, Any], dotted: str) -> Any:
    node: Any = card
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def validate_manifest(card: Any, source: str = "<card>") -> None:
    """Check a card's fields and the consistency of its split policy.

    Raises:
        ManifestError: the first problem found, naming ``source`` and the field.
    """
    if not isinstance(card, dict):
        raise ManifestError(f"dataset card {source}: expected a JSON object, got {type(card).__name__}")
    for dotted, kind in _REQUIRED.items():
        try:
            value = _get(card, dotted)
        except KeyError:
            raise ManifestError(f"dataset card {source}: missing field {dotted!r}") from None
        if isinstance(value, bool) and kind is not bool:
            raise ManifestError(f"dataset card {source}: field {dotted!r} must be {kind}, got a boolean")
        if not isinstance(value, kind):
            raise ManifestError(f"dataset card {source}: field {dotted!r} must be {kind}, got {value!r}")
    if card["modality"] != "CT":
        raise ManifestError(f"dataset card {source}: modality must be 'CT', got {card['modality']!r}")
    if card["cases"]["expected"] < 1:
        raise ManifestError(f"dataset card {source}: cases.expected must be positive")
    fraction = card["split_policy"]["train_test"]["test_fraction"]
    if not 0 < fraction < 1:
        raise ManifestError(
            f"dataset card {source}: split_policy.train_test.test_fraction must be in (0, 1), got {fraction}"
        )
    shots = card["split_policy"]["few_shot"]["shots"]
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots) or shots != sorted(set(shots)):
        raise ManifestError(
            f"dataset card {source}: split_policy.few_shot.shots must be increasing positive integers, got {shots}"
        )
    seeds = card["split_policy"]["few_shot"]["seeds"]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ManifestError(
            f"dataset card {source}: split_policy.few_shot.seeds must be non-negative integers, got {seeds}"
        )
    if shots:
        n_train = card["cases"]["expected"] - round(fraction * card["cases"]["expected"])
        if shots[-1] > n_train:
            raise ManifestError(
                f"dataset card {source}: {shots[-1]} shots exceed the {n_train} training cases of the split policy"
            )
    bad_values = [k for k in card["label"]["values"] if not str(k).isdigit()]
    if bad_values:
        raise ManifestError(f"dataset card {source}: label.values keys must be integers, got {bad_values}")
