"""The unlabeled target volumes of a few-shot run: the training cases that are not shots, without labels."""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar

from dgst_monai.data.cases import CASE_ID_KEY, with_case_ids

__all__ = ["images_only", "unlabeled_cases"]

T = TypeVar("T")


def unlabeled_cases(
    cases: Iterable[Mapping[str, Any]],
    shots: Iterable[Mapping[str, Any]],
    label_keys: Collection[str] = ("label",),
) -> list[dict[str, Any]]:
    """The target training cases that are not among the ``shots``, each without its label entries.

    This is what a transductive method (the size prior of :class:`dgst_monai.handlers.size_prior.SizePriorHandler`)
    may read during fine-tuning: the images of the other training cases of the target domain. Their label keys
    are removed here, so a pipeline built on these entries cannot load a label outside the shots.

    Args:
        cases: the target training cases (``load_split(datalist, "training")``).
        shots: the few-shot subset of ``cases`` (``few_shot(cases, shots, seed)``).
        label_keys: keys to drop.

    Returns:
        Copies of the non-shot cases with their ``case_id`` and without ``label_keys``, in ``cases`` order.

    Raises:
        ValueError: a shot is not among ``cases``, or every case is a shot (nothing unlabeled is left).

    Example::

        training = load_split("datalist.json", "training")
        unlabeled = unlabeled_cases(training, few_shot(training, 5, seed=0))  # [{"case_id": ..., "image": ...}]
    """
    entries = with_case_ids(cases, source="the training cases")
    shot_ids = [entry[CASE_ID_KEY] for entry in with_case_ids(shots, source="the shots")]
    known = {entry[CASE_ID_KEY] for entry in entries}
    unknown = [cid for cid in shot_ids if cid not in known]
    if unknown:
        raise ValueError(f"shots {', '.join(unknown)} are not among the {len(entries)} training cases")
    rest = [
        {k: v for k, v in entry.items() if k not in label_keys}
        for entry in entries
        if entry[CASE_ID_KEY] not in shot_ids
    ]
    if not rest:
        raise ValueError(
            f"all {len(entries)} training cases are shots: there is no unlabeled target volume for the size prior"
        )
    return rest


def images_only(transform: T) -> T:
    """A copy of a MONAI preprocessing pipeline that also runs on entries without a label.

    Every dictionary transform in it (nested ``Compose`` included) gets ``allow_missing_keys=True``, so the
    training preprocessing (``LoadImaged(keys=["image", "label"])``, ...) processes the images of
    :func:`unlabeled_cases` exactly as it processes the training images, from the same configuration.

    Example::

        unlabeled = Dataset(unlabeled_cases(training, shots), transform=images_only(preprocessing))
    """
    pipeline = copy.deepcopy(transform)
    stack: list[Any] = [pipeline]
    while stack:
        item = stack.pop()
        if hasattr(item, "allow_missing_keys"):
            item.allow_missing_keys = True
        stack.extend(getattr(item, "transforms", ()))
    return pipeline
