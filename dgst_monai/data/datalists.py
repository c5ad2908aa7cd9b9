"""MONAI datalists: the embedded synthetic default, splits, few-shot subsets and CT normalisation statistics.

Bundle configs call these by ``$dgst_monai.data.datalists.<name>(...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from monai.data import load_decathlon_datalist


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
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return str(datalist)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    written = write_synthetic_dataset(folder, domain=domain, n=n, seed=seed, **knobs)
    stamp.write_text(json.dumps(wanted))
    return str(written)


def _read(datalist: str | Path) -> dict[str, Any]:
    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from None


def load_split(datalist: str | Path, split: str = "training") -> list[dict[str, Any]]:
    """The cases of ``split`` with paths made absolute, checking that every image and label file exists."""
    content = _read(datalist)
    if split not in content:
        raise KeyError(f"datalist {datalist} has no {split!r} list (it has: {', '.join(content)})")
    cases = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=split)
    missing = [
        f"{case.get('case_id', i)}: {key} {case[key]}"
        for i, case in enumerate(cases)
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
    """
    from dgst_monai.data.splits import case_id_of, nested_shots

    if isinstance(shots, bool) or not 1 <= int(shots) <= len(cases):
        raise ValueError(f"shots must be between 1 and the {len(cases)} available training cases, got {shots}")
    by_id: dict[str, dict[str, Any]] = {}
    for i, case in enumerate(cases):
        cid = case_id_of(case, i)
        if cid in by_id:
            raise ValueError(f"duplicate case id {cid!r} among the training cases")
        by_id[cid] = case
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

    nnU-Net clips CT to the 0.5 / 99.5 percentiles of the foreground and z-scores it with the foreground mean
    and std; that is one linear map with clipping, which ``ScaleIntensityRanged(clip=True)`` does.
    """
    props = _read(datalist).get("intensity_properties")
    needed = ("percentile_00_5", "percentile_99_5", "mean", "std")
    if not isinstance(props, dict) or any(k not in props for k in needed):
        raise KeyError(
            f"datalist {datalist} lacks intensity_properties {needed}: build it with `dgst-monai data index` "
            "or add the foreground HU statistics"
        )
    lo, hi, mean, std = (float(props[k]) for k in needed)
    if not (hi > lo and std > 0):
        raise ValueError(f"datalist {datalist}: implausible intensity_properties {props}")
    return {"a_min": lo, "a_max": hi, "b_min": (lo - mean) / std, "b_max": (hi - mean) / std}
