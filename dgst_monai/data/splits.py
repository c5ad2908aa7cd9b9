"""Deterministic train/test splits and nested k-shot training subsets (the paper's protocol).

The paper splits each downstream dataset 8:2 into training and test cases and fine-tunes on k of the
training cases (SegRap2023 3/5/10, LNQ2023 5/10/20). Here every draw ranks case ids by a SHA-256 hash of
``(purpose, seed, case id)``: the result depends only on the seed and the set of ids - not on file order,
platform or library versions - and adding a case never reshuffles the others. For one seed the k-shot sets are
prefixes of one ranking, so the 3-shot set lies inside the 5-shot set, which lies inside the 10-shot set.

Example:
    >>> from dgst_monai.data.splits import nested_shots, train_test_split
    >>> ids = [f"case_{i:03d}" for i in range(120)]
    >>> train, test = train_test_split(ids, test_fraction=0.2, seed=0)
    >>> len(train), len(test)
    (96, 24)
    >>> sets = nested_shots(train, [3, 5, 10], seed=1)
    >>> set(sets[3]) <= set(sets[5]) <= set(sets[10])
    True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dgst_monai.data.cases import with_case_ids
from dgst_monai.files import atomic_write_json, read_json
from dgst_monai.normalization import DEFAULT_SAMPLES_PER_CASE, intensity_properties

__all__ = ["make_splits", "nested_shots", "parse_int_list", "ranked", "train_test_split"]


def ranked(case_ids: Iterable[str], seed: int, purpose: str) -> list[str]:
    """``case_ids`` ordered by SHA-256 of ``purpose:seed:id`` (ties, impossible in practice, by id).

    Raises:
        ValueError: duplicate ids.
    """
    ids = list(case_ids)
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"duplicate case ids: {', '.join(dupes)}")
    key = lambda cid: (hashlib.sha256(f"{purpose}:{int(seed)}:{cid}".encode()).hexdigest(), cid)  # noqa: E731
    return sorted(ids, key=key)


def train_test_split(case_ids: Sequence[str], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split into (training, test) ids, each sorted; ``round(test_fraction * n)`` test cases.

    Raises:
        ValueError: fewer than 2 cases, a fraction outside (0, 1), or one that leaves a side empty.
    """
    n = len(case_ids)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(test_fraction * n)
    if n < 2 or not 1 <= n_test <= n - 1:
        raise ValueError(
            f"cannot split {n} case(s) with test_fraction {test_fraction}: both training and test need a case"
        )
    order = ranked(case_ids, seed, "test")
    return sorted(order[n_test:]), sorted(order[:n_test])


def nested_shots(train_ids: Sequence[str], shots: Iterable[int], seed: int = 0) -> dict[int, list[str]]:
    """k-shot subsets of ``train_ids`` for one seed: each the first k of one seeded ranking (so nested).

    Returns:
        ``{k: ids}`` with ids in ranking order (the first is the 1-shot case).

    Raises:
        ValueError: a k below 1 or above the number of training cases.
    """
    order = ranked(train_ids, seed, "shots")
    out: dict[int, list[str]] = {}
    for k in sorted(set(int(s) for s in shots)):
        if not 1 <= k <= len(order):
            raise ValueError(
                f"{k} shots requested but there are {len(order)} training cases (need 1 <= k <= {len(order)})"
            )
        out[k] = order[:k]
    return out


def extend_splits(splits: str | os.PathLike[str], shots: Iterable[int], seeds: Iterable[int]) -> list[tuple[int, int]]:
    """Add the few-shot subsets a splits JSON lacks for ``seeds`` x ``shots``; the subsets it has stay as they are.

    A grid that grows (more seeds, another shot level) keeps its test cases and the subsets its finished runs
    used; the new subsets are the ones :func:`make_splits` draws for the same training cases.

    Returns:
        The ``(seed, k)`` pairs added (the file is rewritten only when there are some).

    Raises:
        ValueError: a k above the number of training cases.
    """
    path = Path(splits)
    content = read_json(path, "splits")
    train_ids = [case["case_id"] for case in with_case_ids(content.get("training", []), source=str(path))]
    table = content.setdefault("few_shot", {})
    seed_list, shot_list = [int(s) for s in seeds], sorted(set(int(k) for k in shots))
    added = [(s, k) for s in seed_list for k in shot_list if str(k) not in table.get(str(s), {})]
    if not added:
        return []
    for s, k in added:
        table.setdefault(str(s), {})[str(k)] = nested_shots(train_ids, [k], s)[k]
    content["seeds"] = sorted(set(content.get("seeds", [])) | set(seed_list))
    content["shots"] = sorted(set(content.get("shots", [])) | set(shot_list))
    atomic_write_json(path, content)
    return added


def parse_int_list(value: Any, name: str) -> list[int]:
    """Integers from ``3,5,10`` / ``"3,5,10"`` / ``[3, 5]`` / ``3`` / ``""`` (what a command line gives).

    Raises:
        ValueError: a value that is not a non-negative integer (the message names ``name``).
    """
    if value is None or value == "":
        return []
    items: list[Any]
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            iv = -1
        elif isinstance(v, str):
            iv = int(v) if v.strip().isdigit() else -1
        else:
            iv = int(v) if float(v).is_integer() else -1
        if iv < 0:
            raise ValueError(f"{name}: expected non-negative integers like 3,5,10, got {value!r}")
        out.append(iv)
    return out


def make_splits(
    datalist: str | os.PathLike[str],
    shots: Iterable[int] = (3, 5, 10),
    seeds: Iterable[int] = (0, 1, 2),
    output: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    intensity: str = "auto",
    samples_per_case: int | None = DEFAULT_SAMPLES_PER_CASE,
) -> dict[str, Any]:
    """Deterministic train/test split and nested few-shot subsets of a datalist; optionally written as JSON.

    If the datalist has a non-empty ``test`` list, it is kept and only the few-shot subsets are drawn (from
    ``training``); otherwise the ``training`` cases are split ``1 - test_fraction : test_fraction`` with
    ``split_seed``. The result is itself a MONAI datalist (``training`` / ``test`` lists, relative paths re-based
    to the output's folder, ``intensity_properties``), so a bundle can use it as its ``datalist``, plus::

        "few_shot": {"<seed>": {"<k>": [case ids]}}

    which :func:`dgst_monai.data.datalists.few_shot` reproduces for the same training cases.

    Args:
        datalist: a MONAI datalist JSON (paths relative to its folder or absolute).
        shots: k values (may be empty).
        seeds: few-shot seeds.
        output: where to write the splits JSON (None: do not write).
        test_fraction: share of test cases when splitting (0.2 is the paper's 8:2).
        split_seed: seed of the train/test split.
        intensity: ``"auto"`` recomputes ``intensity_properties`` over the new training cases when this
            function made the test set (so test voxels never shape the normalisation) and copies them
            otherwise; ``"train"`` always recomputes; ``"copy"`` always copies.
        samples_per_case: foreground voxels sampled per case when recomputing.

    Returns:
        The splits dictionary.

    Raises:
        ValueError: duplicate case ids, too few cases, k above the training count, bad ``intensity``.
    """
    if intensity not in ("auto", "train", "copy"):
        raise ValueError(f"intensity must be 'auto', 'train' or 'copy', got {intensity!r}")
    src = Path(datalist)
    content = read_json(src, "datalist")
    training, given_test = _datalist_cases(content, src)
    by_id = {case["case_id"]: case for case in training + given_test}

    made_test = not given_test
    if made_test:
        train_ids, test_ids = train_test_split([c["case_id"] for c in training], test_fraction, split_seed)
    else:
        train_ids, test_ids = [c["case_id"] for c in training], [c["case_id"] for c in given_test]
    shot_list = sorted(set(int(k) for k in shots))
    seed_list = [int(s) for s in seeds]
    few = {str(s): {str(k): v for k, v in nested_shots(train_ids, shot_list, s).items()} for s in seed_list}

    out_dir = Path(output).resolve().parent if output is not None else src.resolve().parent
    train_cases = [_rebase(by_id[i], src.resolve().parent, out_dir) for i in train_ids]
    test_cases = [_rebase(by_id[i], src.resolve().parent, out_dir) for i in test_ids]
    recompute = intensity == "train" or (intensity == "auto" and made_test)
    if recompute:
        props = intensity_properties(
            [by_id[i] for i in train_ids], base_dir=src.resolve().parent, samples_per_case=samples_per_case,
            seed=split_seed,
        )
    else:
        props = content.get("intensity_properties")
    result: dict[str, Any] = {
        **_splits_header(content, src, out_dir, made_test, test_fraction, split_seed),
        "shots": shot_list,
        "seeds": seed_list,
        "labels": content.get("labels", {"0": "background", "1": "lymph_node"}),
        "modality": content.get("modality", {"0": "CT"}),
        "intensity_properties": props,
        "intensity_source": "training cases of this split" if recompute else f"copied from {src.name}",
        "numTraining": len(train_cases),
        "numTest": len(test_cases),
        "training": train_cases,
        "test": test_cases,
        "few_shot": few,
    }
    if output is not None:
        atomic_write_json(output, result)
    return result


def _datalist_cases(content: dict[str, Any], src: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The datalist's training and test cases (copies), each with a ``case_id``.

    Raises:
        ValueError: no training cases, or case ids repeated across the two lists.
    """
    training = [dict(c) for c in content.get("training") or []]
    given_test = [dict(c) for c in content.get("test") or [] if isinstance(c, dict)]
    if not training:
        raise ValueError(f"datalist {src} has no training cases")
    cases = with_case_ids(training + given_test, f"datalist {src}")  # ids unique across both lists
    return cases[: len(training)], cases[len(training) :]


def _rebase(case: dict[str, Any], src_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A copy of ``case`` whose relative image and label paths, relative to ``src_dir``, are made relative to
    ``out_dir``; absolute paths stay absolute."""
    moved = dict(case)
    for key in ("image", "label"):
        if isinstance(moved.get(key), str) and not Path(moved[key]).is_absolute():
            moved[key] = os.path.relpath(os.path.normpath(src_dir / moved[key]), out_dir)
    return moved


def _splits_header(
    content: dict[str, Any], src: Path, out_dir: Path, made_test: bool, test_fraction: float, split_seed: int
) -> dict[str, Any]:
    """Name, description, source and split method of a splits file."""
    if made_test:
        how = f"seeded {100 * (1 - test_fraction):g}:{100 * test_fraction:g} train/test split (seed {split_seed})"
    else:
        how = "the datalist's own test list"
    return {
        "name": f"{content.get('name', src.stem)}_splits",
        "description": f"Splits of {src.name}: {how}; nested few-shot subsets per seed (`dgst-monai data split`).",
        "source_datalist": os.path.relpath(src.resolve(), out_dir),
        "paths": "relative to this file's folder",
        "split": {
            "made_here": made_test,
            "test_fraction": test_fraction if made_test else None,
            "split_seed": split_seed if made_test else None,
            "method": "sha256 rank of (purpose, seed, case id)",
        },
    }
