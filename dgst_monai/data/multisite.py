"""The benchmark's synthetic targets: a single-scanner and a multi-site mediastinal CT set, and the source set.

``dgst-monai benchmark`` without a datalist runs on these. Their definition lives in the data manifest
(``data_manifests/synthetic.json``, section ``benchmark_targets``), fixed before any method was run on them:

* ``source``: the head-and-neck phantoms the foundation model is pre-trained on;
* ``mediastinum``: one scanner, the phantom defaults of the mediastinum domain for every case;
* ``multisite``: every case draws its scanner (noise, reconstruction kernel, contrast phase, slice thickness,
  in-plane spacing, array orientation) and patient knobs (body size, number of nodes, fatty hila) on its own,
  from the ranges of the manifest, so that the few shots and the test cases differ as they do across hospitals.

Case ``i`` of a set gets the phantom seed :func:`dgst_monai.data.phantoms.write_synthetic_dataset` would give
it, so the two targets show the same patients through different scanners; the knob draw of a multi-site case
uses its own generator (dataset seed, case index), independent of every other case. All cases are written as
``training`` cases: the benchmark makes its seeded 8:2 split itself (:func:`dgst_monai.data.splits.make_splits`).

Example:
    >>> from dgst_monai.data.multisite import case_knobs, target_spec
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

__all__ = ["BENCHMARK_SETS", "benchmark_datalist", "case_knobs", "target_spec"]

#: The sets of ``benchmark_targets`` in the manifest: the source and the two targets.
BENCHMARK_SETS: tuple[str, ...] = ("source", "mediastinum", "multisite")

_DRAWS = ("uniform", "integers", "choice")


def target_spec(name: str, manifest: str | os.PathLike[str] = "synthetic") -> dict[str, Any]:
    """The complete definition of one benchmark set, read from the data manifest.

    Returns:
        ``{"name", "domain", "n_cases", "dataset_seed", "knobs", "draws", "split"}``: ``knobs`` are fixed for
        every case, ``draws`` maps a knob to its per-case distribution (``{"uniform": [lo, hi]}``,
        ``{"integers": [lo, hi]}`` inclusive, ``{"choice": [...]}``); ``split`` is the 8:2 split's settings
        (None for the source set, which is not split).

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
        if name == "source":
            src = section["source"]
            spec = {"domain": src["domain"], "n_cases": src["n_cases"], "dataset_seed": src["dataset_seed"]}
            knobs, draws, split = dict(src.get("knobs", {})), {}, None
        else:
            common, target = section["common"], section["targets"][name]
            spec = {k: common[k] for k in ("domain", "n_cases", "dataset_seed")}
            knobs, split = dict(common.get("knobs", {})), dict(common["split"])
            draws = {**target.get("scanner", {}), **target.get("patient", {})}
    except KeyError as err:
        raise ValueError(f"data manifest {manifest!r}: benchmark_targets lacks {err} (set {name!r})") from None
    for knob, draw in draws.items():
        if not isinstance(draw, dict) or len(draw) != 1 or next(iter(draw)) not in _DRAWS:
            raise ValueError(
                f"data manifest {manifest!r}: benchmark_targets.{name}.{knob} must be one of "
                f"{{'uniform': [lo, hi]}}, {{'integers': [lo, hi]}}, {{'choice': [...]}}; got {draw!r}"
            )
    return {"name": name, **spec, "knobs": knobs, "draws": draws, "split": split}


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
    every case under ``training`` (none under ``test``) and records each case's knobs (``case_knobs``) and
    phantom seed (``case_seeds``).

    Args:
        folder: output folder.
        name: ``source``, ``mediastinum`` or ``multisite``.
        n: number of cases (default: the manifest's).
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
    n = int(spec["n_cases"] if n is None else n)
    seed = int(spec["dataset_seed"] if seed is None else seed)
    if n < 1:
        raise ValueError(f"n must be a positive number of cases, got {n}")
    out = pathlib.Path(folder)
    datalist, stamp = out / "datalist.json", out / "request.json"
    wanted = json.loads(json.dumps({"set": spec, "n": n, "seed": seed}))  # tuples as lists, as read back
    if datalist.is_file() and stamp.is_file() and read_json(stamp, "request") == wanted:
        return str(datalist)
    stamp.unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    prefix = "multisite" if name == "multisite" else spec["domain"]
    training, seeds, per_case, samples = [], {}, {}, []
    for i in range(n):
        case_id = f"{prefix}_{i:04d}"
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])  # as write_synthetic_dataset
        kn = resolve_knobs(spec["domain"], **case_knobs(spec, i, seed))
        case = synthesize_case(spec["domain"], case_seed, case_id=case_id, **kn)
        rel_img, rel_lab = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        write_nifti(out / rel_img, case.image, case.affine)
        write_nifti(out / rel_lab, case.label, case.affine)
        training.append({"case_id": case_id, "image": rel_img, "label": rel_lab})
        seeds[case_id] = case_seed
        per_case[case_id] = {k: list(v) if isinstance(v, tuple) else v for k, v in kn.items()}
        samples.append(foreground_sample(case.image, case.label, case_id))
    atomic_write_json(
        datalist,
        {
            "name": f"dgst_benchmark_{name}",
            "domain": spec["domain"],
            "description": f"Benchmark set {name!r} of data_manifests/synthetic.json (dgst_monai.data.multisite).",
            "labels": {"0": "background", "1": "lymph_node"},
            "modality": {"0": "CT"},
            "intensity_properties": intensity_properties_of(samples),
            "seed": seed,
            "case_seeds": seeds,
            "case_knobs": per_case,
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        },
    )
    atomic_write_json(stamp, wanted)
    return str(datalist)
