"""MONAI datalists: the embedded synthetic default, splits, few-shot subsets and CT normalisation statistics.

Bundle configs call these as components, e.g. ``{"_target_": "dgst_monai.data.datalists.load_split",
"datalist": "@datalist", "split": "training"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist

from dgst_monai.data.cases import CASE_ID_KEY, with_case_ids
from dgst_monai.files import atomic_write_json, read_json
from dgst_monai.normalization import INTENSITY_STATISTICS, scale_intensity_range


def synthetic_datalist(folder: str | Path, domain: str = "hn", n: int = 20, seed: int = 0, **knobs: Any) -> str:
    """Path of a synthetic CT datalist in ``folder``, generating the phantoms first if they are not there.

    Generation is deterministic and every file is written atomically with the datalist last, so a run that
    was interrupted regenerates, and concurrent ranks write identical bytes.
    """
    from dgst_monai.data.phantoms import write_synthetic_dataset

    folder = Path(folder)
    datalist = folder / "datalist.json"
    # through JSON, so that tuples compare equal to the lists read back
    wanted = json.loads(json.dumps({"domain": domain, "n": n, "seed": seed, "knobs": knobs}))
    stamp = folder / "request.json"
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == wanted:
        return str(datalist)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    written = write_synthetic_dataset(folder, domain=domain, n=n, seed=seed, **knobs)
    atomic_write_json(stamp, wanted)
    return str(written)


def _read(datalist: str | Path) -> dict[str, Any]:
    return read_json(datalist, "datalist")


def load_split(datalist: str | Path, split: str = "training") -> list[dict[str, Any]]:
    """The cases of ``split`` with paths made absolute, each with its ``case_id``, checking that every image
    and label file exists (without reading any).

    Entries without a ``case_id`` get the one :func:`dgst_monai.data.cases.case_id_of` derives, so every batch
    carries the id that splits and reports use.

    Raises:
        KeyError: the datalist has no such list.
        ValueError: two entries have the same case id.
        FileNotFoundError: an image or label file is missing (all are listed).

    Example::

        test_cases = load_split("datalist.json", "test")  # [{"case_id": ..., "image": ..., "label": ...}, ...]
    """
    content = _read(datalist)
    if split not in content:
        raise KeyError(f"datalist {datalist} has no {split!r} list (it has: {', '.join(content)})")
    loaded = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=split)
    # MONAI turns every string that names an existing path beside the datalist into that path: a case id equal
    # to its case folder's name (SegRap's layout, with the datalist in the download) must stay the id
    for case, entry in zip(loaded, content[split]):
        if isinstance(entry, dict) and CASE_ID_KEY in entry:
            case[CASE_ID_KEY] = entry[CASE_ID_KEY]
    cases = with_case_ids(loaded, source=f"datalist {datalist}, split {split!r}")
    missing = [
        f"{case['case_id']}: {key} {case[key]}"
        for case in cases
        for key in ("image", "label")
        if key in case and not Path(case[key]).exists()
    ]
    if missing:
        raise FileNotFoundError(f"datalist {datalist}, split {split!r}: missing files:\n  " + "\n  ".join(missing))
    return cases


def few_shot(
    cases: list[dict[str, Any]], shots: int, seed: int = 0, splits: str | Path | None = None
) -> list[dict[str, Any]]:
    """``shots`` training cases for ``seed``: nested (for one seed the 3-shot set lies in the 5-shot set, ...).

    Without ``splits`` the cases are ranked by :func:`dgst_monai.data.splits.nested_shots` (a hash of seed and
    case id), which is what ``dgst-monai data split`` writes, so the two always agree; the choice does not
    depend on the order of ``cases``. With ``splits`` (a splits JSON of ``data split``, possibly edited by
    hand) its ``few_shot[seed][shots]`` case ids are used.

    Raises:
        ValueError: ``shots`` out of range, duplicate case ids, or a splits file whose ids are not in ``cases``.
        KeyError: ``splits`` has no subset for this seed and number of shots.

    Example::

        shots = few_shot(load_split("datalist.json"), shots=5, seed=0)  # each entry with its case_id
    """
    from dgst_monai.data.splits import nested_shots

    if isinstance(shots, bool) or not 1 <= int(shots) <= len(cases):
        raise ValueError(f"shots must be between 1 and the {len(cases)} available training cases, got {shots}")
    by_id = {case["case_id"]: case for case in with_case_ids(cases, source="the training cases")}
    if splits is None:
        chosen = nested_shots(list(by_id), [int(shots)], int(seed))[int(shots)]
    else:
        table = _read(splits).get("few_shot", {})
        try:
            chosen = list(table[str(seed)][str(int(shots))])
        except KeyError:
            raise KeyError(f"splits {splits} has no {shots}-shot subset for seed {seed}") from None
        unknown = [cid for cid in chosen if cid not in by_id]
        if unknown:
            raise ValueError(f"splits {splits}: case ids {', '.join(unknown)} are not among the training cases")
    return [by_id[cid] for cid in chosen]


def holdout(cases: list[dict[str, Any]], n_validation: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split off the last ``n_validation`` cases for validation: (training, validation)."""
    if not 0 <= n_validation < len(cases):
        raise ValueError(f"n_validation must be in [0, {len(cases) - 1}] for {len(cases)} cases, got {n_validation}")
    cut = len(cases) - n_validation
    return cases[:cut], cases[cut:]


def ct_normalization(datalist: str | Path) -> dict[str, float]:
    """``ScaleIntensityRanged`` arguments for nnU-Net's CT normalisation from the datalist's statistics.

    The datalist's ``intensity_properties`` (written by ``dgst-monai data index`` / ``data synth`` over its
    training cases) go through :func:`dgst_monai.normalization.scale_intensity_range`; to estimate them from
    some cases only (the shots of a fine-tune), use :func:`dgst_monai.normalization.normalization_from_cases`.

    Raises:
        KeyError: the datalist has no ``intensity_properties``.
        ValueError: they are null (no labelled voxel in its training cases) or implausible.

    Example::

        intensity = ct_normalization("datalist.json")  # {"a_min": ..., "a_max": ..., "b_min": ..., "b_max": ...}
    """
    content = _read(datalist)
    if "intensity_properties" not in content:
        raise KeyError(
            f"datalist {datalist} lacks intensity_properties {INTENSITY_STATISTICS}: build it with `dgst-monai data "
            "index` or add the foreground HU statistics"
        )
    return scale_intensity_range(content["intensity_properties"], f"datalist {datalist}")
