"""The benchmark's synthetic sets: three mediastinal CT targets, the source set and its held-out test set.

``dgst-monai benchmark`` without a datalist runs on these. Their definition lives in the data manifest
(``data_manifests/synthetic.json``, section ``benchmark_targets``), fixed before any method was run on them:

* ``source``: the head-and-neck phantoms the foundation model is pre-trained on;
* ``source_test``: other head-and-neck patients, all test cases: what fine-tuning forgets of the source;
* ``mediastinum``: one scanner, the phantom defaults of the mediastinum domain for every case;
* ``multisite``: every case draws its scanner (noise, reconstruction kernel, contrast phase, slice thickness,
  in-plane spacing, array orientation) and patient knobs (body size, number of nodes, fatty hila) on its own,
  from the ranges of the manifest, so that the few shots and the test cases differ as they do across hospitals;
* ``site_shift``: training cases (the shots' pool) from one fixed scanner, test cases drawn as ``multisite``'s:
  a few shots of one site can be fitted closely while the test asks for generality.

Case ``i`` of a set gets the phantom seed :func:`dgst_monai.data.phantoms.write_synthetic_dataset` would give
it, so ``mediastinum`` and ``multisite`` show the same patients through different scanners; the knob draw of a
multi-site case uses its own generator (dataset seed, case index), independent of every other case. The cases of
``mediastinum`` and ``multisite`` are written as ``training`` cases, and the benchmark makes its seeded 8:2 split
itself (:func:`dgst_monai.data.splits.make_splits`); ``site_shift`` and ``source_test`` carry their own test
cases.

Example:
    >>> from dgst_monai.data.phantoms.benchmark_sets import case_knobs, target_spec
    >>> spec = target_spec("multisite")
    >>> knobs = case_knobs(spec, index=3)
    >>> 10.0 <= knobs["noise_sigma"] <= 40.0 and knobs["recon_kernel"] in ("soft", "sharp")
    True
    >>> datalist = benchmark_datalist("/tmp/ms", "multisite", n=100)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from dgst_monai.data.manifests import load_manifest
from dgst_monai.files import atomic_write_json, read_json

__all__ = ["BENCHMARK_SETS", "BENCHMARK_TARGETS", "benchmark_datalist", "case_knobs", "case_plan", "target_spec"]

#: The sets of ``benchmark_targets`` in the manifest: the source, its held-out test set and the targets.
BENCHMARK_SETS: tuple[str, ...] = ("source", "source_test", "mediastinum", "multisite", "site_shift")
#: The target sets (``dgst-monai benchmark --target``).
BENCHMARK_TARGETS: tuple[str, ...] = ("multisite", "mediastinum", "site_shift")

_DRAWS = ("uniform", "integers", "choice")


def target_spec(name: str, manifest: str | os.PathLike[str] = "synthetic") -> dict[str, Any]:
    """The complete definition of one benchmark set, read from the data manifest.

    Returns:
        ``{"name", "domain", "n_cases", "dataset_seed", "knobs", "draws", "split", "lists"}``: ``knobs`` are fixed
        for every case, ``draws`` maps a knob to its per-case distribution (``{"uniform": [lo, hi]}``,
        ``{"integers": [lo, hi]}`` inclusive, ``{"choice": [...]}``); ``split`` is the 8:2 split's settings
        (None for the sets that are not split); ``lists`` is how the cases fill the datalist's lists
        (:func:`case_plan`): ``{list name: {"n_cases", "first_index", "knobs", "draws"}}`` with per-list fixed
        knobs and draws over the set's.

    Raises:
        ValueError: an unknown set name, or a manifest without a valid ``benchmark_targets`` section.
    """
    if name not in BENCHMARK_SETS:
        raise ValueError(f"unknown benchmark set {name!r}; choose one of {', '.join(BENCHMARK_SETS)}")
    card = load_manifest(manifest)
    section = card.get("benchmark_targets")
    if not isinstance(section, dict):
        raise ValueError(f"data manifest {manifest!r} has no `benchmark_targets` section")
    try:
        if name in ("source", "source_test"):
            src = section[name]
            spec = {"domain": src["domain"], "n_cases": src["n_cases"], "dataset_seed": src["dataset_seed"]}
            knobs, draws, split = dict(src.get("knobs", {})), {}, None
            part = {"n_cases": src["n_cases"], "first_index": 0, "knobs": {}, "draws": {}}
            lists = {"test" if name == "source_test" else "training": part}
        else:
            common, target = section["common"], section["targets"][name]
            spec = {k: common[k] for k in ("domain", "n_cases", "dataset_seed")}
            knobs, split = dict(common.get("knobs", {})), dict(common["split"])
            draws = _draws(target)
            lists = {"training": {"n_cases": common["n_cases"], "first_index": 0, "knobs": {}, "draws": {}}}
            if "test_draws" in target:  # its own test list, from another target's draws
                spec["n_cases"] = target["training_cases"] + target["test_cases"]
                split = None
                lists = {
                    "training": {"n_cases": target["training_cases"], "first_index": 0,
                                 "knobs": dict(target["training_scanner"]), "draws": {}},
                    "test": {"n_cases": target["test_cases"], "first_index": target["test_first_index"],
                             "knobs": {}, "draws": _draws(section["targets"][target["test_draws"]])},
                }
    except KeyError as err:
        raise ValueError(f"data manifest {manifest!r}: benchmark_targets lacks {err} (set {name!r})") from None
    for knob, draw in [*draws.items(), *[kv for part in lists.values() for kv in part["draws"].items()]]:
        if not isinstance(draw, dict) or len(draw) != 1 or next(iter(draw)) not in _DRAWS:
            raise ValueError(
                f"data manifest {manifest!r}: benchmark_targets.{name}.{knob} must be one of "
                f"{{'uniform': [lo, hi]}}, {{'integers': [lo, hi]}}, {{'choice': [...]}}; got {draw!r}"
            )
    return {"name": name, **spec, "knobs": knobs, "draws": draws, "split": split, "lists": lists}


def _draws(target: dict[str, Any]) -> dict[str, Any]:
    return {**target.get("scanner", {}), **target.get("patient", {})}


def case_plan(spec: dict[str, Any], n: int | None = None) -> list[tuple[str, int, dict[str, Any]]]:
    """Every case of a set: ``(datalist list, case index, the set spec of that case)``, in order.

    A set with one list has ``n`` cases (default: the manifest's); a set with a training and a test list scales
    both by ``n / n_cases`` (at least one case each), so a small ``n`` keeps both lists.

    Example:
        >>> [(part, i) for part, i, _ in case_plan(target_spec("site_shift"), n=4)]
        [('training', 0), ('training', 1), ('test', 1000), ('test', 1001)]
    """
    total = int(spec["n_cases"] if n is None else n)
    if total < 1:
        raise ValueError(f"n must be a positive number of cases, got {total}")
    plan = []
    for name, part in spec["lists"].items():
        count = total if len(spec["lists"]) == 1 else max(1, round(total * part["n_cases"] / spec["n_cases"]))
        case_spec = {**spec, "knobs": {**spec["knobs"], **part["knobs"]}, "draws": {**spec["draws"], **part["draws"]}}
        plan += [(name, part["first_index"] + i, case_spec) for i in range(count)]
    return plan


def case_knobs(spec: dict[str, Any], index: int, seed: int | None = None) -> dict[str, Any]:
    """The phantom knobs of case ``index`` of a set: its fixed knobs and its own draws.

    ``in_plane_spacing_mm`` and ``slice_thickness_mm`` draws become ``spacing_mm = (s, s, t)`` (contiguous
    slices); every other draw is the phantom knob of that name. A patient-range knob such as
    ``anatomy_scale`` is drawn once per case and passed as the degenerate range ``(v, v)``.

    Args:
        spec: a :func:`target_spec` result (its ``knobs`` may carry overrides, e.g. a small ``fov_mm``).
        index: case index in the set.
        seed: dataset seed (default: the spec's).

    Returns:
        Keyword arguments of :func:`dgst_monai.data.phantoms.synthesize_case`.
    """
    knobs = dict(spec["knobs"])
    draws = spec["draws"]
    if not draws:
        return knobs
    dataset_seed = int(spec["dataset_seed"] if seed is None else seed)
    # a stream of its own (the trailing 7 keeps it apart from the phantom seeds derived from [seed, index])
    rng = np.random.default_rng(np.random.SeedSequence([dataset_seed, int(index), 7]))
    drawn: dict[str, Any] = {}
    for knob in sorted(draws):  # sorted: the draw order, hence the values, do not depend on the JSON's order
        (kind, values), = draws[knob].items()
        if kind == "uniform":
            drawn[knob] = float(rng.uniform(float(values[0]), float(values[1])))
        elif kind == "integers":
            drawn[knob] = int(rng.integers(int(values[0]), int(values[1]) + 1))
        else:
            drawn[knob] = values[int(rng.integers(len(values)))]
    in_plane = drawn.pop("in_plane_spacing_mm", None)
    thickness = drawn.pop("slice_thickness_mm", None)
    if in_plane is not None or thickness is not None:
        from dgst_monai.data.phantoms import default_knobs

        sx, sy, sz = knobs.get("spacing_mm", default_knobs(spec["domain"])["spacing_mm"])
        knobs["spacing_mm"] = (
            in_plane if in_plane is not None else sx,
            in_plane if in_plane is not None else sy,
            thickness if thickness is not None else sz,
        )
        knobs["slice_thickness_mm"] = None  # = the slice spacing
    for knob in ("anatomy_scale", "node_short_axis_mm"):
        if knob in drawn:
            drawn[knob] = (drawn[knob], drawn[knob])
    knobs.update(drawn)
    return knobs


def benchmark_datalist(
    folder: str | os.PathLike[str],
    name: str,
    n: int | None = None,
    seed: int | None = None,
    **knobs: Any,
) -> str:
    """Path of the datalist of benchmark set ``name`` in ``folder``, generating the phantoms if not there yet.

    Like :func:`dgst_monai.data.datalists.synthetic_datalist`, the request is stamped beside the datalist
    (``request.json``): an identical request reuses the files, any other one rewrites them. The datalist lists
    the cases as :func:`case_plan` places them (``training``, except ``source_test``'s and ``site_shift``'s test
    cases) and records each case's knobs (``case_knobs``) and phantom seed (``case_seeds``).

    Args:
        folder: output folder.
        name: one of :data:`BENCHMARK_SETS`.
        n: number of cases (default: the manifest's; see :func:`case_plan`).
        seed: dataset seed (default: the manifest's).
        **knobs: fixed phantom knobs over the manifest's (e.g. a small ``fov_mm`` for tests); drawn knobs
            stay drawn.

    Returns:
        The path of ``datalist.json``.

    Example::

        datalist = benchmark_datalist("runs/cache/multisite", "multisite")  # 100 cases, about 3 minutes
    """
    from dgst_monai.data.phantoms import resolve_knobs, synthesize_case, write_nifti
    from dgst_monai.normalization import foreground_sample, intensity_properties_of

    spec = target_spec(name)
    spec["knobs"] = {**spec["knobs"], **knobs}
    plan = case_plan(spec, n)
    seed = int(spec["dataset_seed"] if seed is None else seed)
    out = pathlib.Path(folder)
    datalist, stamp = out / "datalist.json", out / "request.json"
    wanted = json.loads(json.dumps({"set": spec, "n": len(plan), "seed": seed}))  # tuples as lists, as read back
    if datalist.is_file() and stamp.is_file() and read_json(stamp, "request") == wanted:
        return str(datalist)
    stamp.unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    prefix = name if name in ("multisite", "site_shift", "source_test") else spec["domain"]
    lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    seeds, per_case, samples = {}, {}, []
    for part, i, case_spec in plan:
        case_id = f"{prefix}_{i:04d}"
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])  # as write_synthetic_dataset
        kn = resolve_knobs(spec["domain"], **case_knobs(case_spec, i, seed))
        case = synthesize_case(spec["domain"], case_seed, case_id=case_id, **kn)
        rel_img, rel_lab = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        write_nifti(out / rel_img, case.image, case.affine)
        write_nifti(out / rel_lab, case.label, case.affine)
        lists[part].append({"case_id": case_id, "image": rel_img, "label": rel_lab})
        seeds[case_id] = case_seed
        per_case[case_id] = {k: list(v) if isinstance(v, tuple) else v for k, v in kn.items()}
        if part == "training":  # as make_splits: test voxels never shape the normalisation
            samples.append(foreground_sample(case.image, case.label, case_id))
    atomic_write_json(
        datalist,
        {
            "name": f"dgst_benchmark_{name}",
            "domain": spec["domain"],
            "description": f"Benchmark set {name!r} of data_manifests/synthetic.json (dgst_monai.data.phantoms.benchmark_sets).",
            "labels": {"0": "background", "1": "lymph_node"},
            "modality": {"0": "CT"},
            # a test-only set (source_test) has none: the model's own normalisation scores it
            **({"intensity_properties": intensity_properties_of(samples)} if samples else {}),
            "seed": seed,
            "case_seeds": seeds,
            "case_knobs": per_case,
            "numTraining": len(lists["training"]),
            "numTest": len(lists["test"]),
            **lists,
        },
    )
    atomic_write_json(stamp, wanted)
    return str(datalist)
