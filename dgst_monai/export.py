"""A trained or fine-tuned checkpoint as a standalone model-zoo bundle zip: the ``dgst-monai export`` command.

A site that fine-tuned the foundation model on its own scans shares or serves the result as a MONAI bundle of
its own. :func:`export_bundle` writes one from the source bundle's folder and the checkpoint:

* ``configs/train.json`` and ``configs/inference.json`` with the network the checkpoint was trained with written
  out as ``"plan": {...}`` (:meth:`dgst_monai.networks.DynUNetPlan.to_config`; the ``preset`` that chose it is
  dropped, since the weights fix the topology); an overlay named by ``--preset`` (``cpu_small``: the bundle's
  ``configs/cpu_small.json``) is merged in first. The plan comes from the training record beside the checkpoint,
  else from the network preset;
* ``models/model.pt`` (the checkpoint), ``models/normalization.json`` (its CT normalisation) and
  ``models/model.ts`` (TorchScript by ``monai.bundle.ckpt_export``: scripted, or traced where scripting fails,
  as for SwinUNETR; checked to give the checkpoint's output);
* ``configs/metadata.json`` with a new version whose ``changelog`` entry names the method, shots and data (from
  the training record), ``eval_metrics`` from an evaluation ``summary.json`` and the versions it was exported
  with; ``docs/README.md`` with a section on the export; ``large_files.yml`` listing only files too large for
  the model zoo (which then need ``weights_url``).

Before anything is written, a copy of the staged folder passes the model zoo's checks (:func:`verify_bundle`).

The training record is a small JSON file, ``training_record.json``, that a training or fine-tuning run writes
beside its checkpoint with :func:`save_training_record` (the bundle's ``run`` list calls it after training).

Example::

    from dgst_monai.export import export_bundle

    export_bundle("bundles/ln_ct_dynunet", "tuned/model.pt", "ln_ct_dynunet_site.zip",
                  evaluation="tuned/eval/summary.json")
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dgst_monai.config_values import set_config_key
from dgst_monai.files import atomic_open, atomic_torch_save, atomic_write, atomic_write_json, read_json

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = [
    "MAX_FILE_BYTES",
    "RECORD_FILE",
    "REQUIRED_FILES",
    "REQUIRED_METADATA",
    "BundleCheckError",
    "bundle_workflow",
    "export_bundle",
    "load_training_record",
    "save_training_record",
    "verify_bundle",
    "verify_network",
]

logger = logging.getLogger(__name__)
#: said whenever a bundle is exported without an evaluation summary
NO_EVALUATION = (
    "no evaluation given: the exported bundle carries no eval_metrics (its metadata says 'Not evaluated at "
    "export'); pass --evaluation <ckpt_dir>/eval/summary.json (written by configs/evaluate.json) to include them"
)

#: The record of a training run, beside its checkpoint.
RECORD_FILE = "training_record.json"
#: The model zoo's limit for a file in a bundle; larger files are fetched through ``large_files.yml``.
MAX_FILE_BYTES = 25_000_000
#: Files every model-zoo bundle has (``models/model.pt`` too, unless ``large_files.yml`` lists it).
REQUIRED_FILES = ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/inference.json", "docs/README.md")
#: Metadata fields of the MONAI bundle specification that the model zoo's schema requires.
REQUIRED_METADATA = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "name",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
#: Run outputs in a bundle folder (datasets, checkpoints, evaluations): never part of an exported bundle.
RUN_OUTPUTS = ("data", "models", "eval")
#: The configs an export rewrites; every other file is copied as it is.
_NETWORK_CONFIGS = ("train", "inference")
_BUNDLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_MODEL_FILES = ("model.pt", "model.ts", "normalization.json")


class BundleCheckError(ValueError):
    """A bundle folder fails the model zoo's checks; the message lists every problem found."""


# ------------------------------------------------------------------------------------------------------------
# The training record
# ------------------------------------------------------------------------------------------------------------


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

    :func:`export_bundle` reads it to write the exported bundle's network and changelog. A plan (anything
    with ``to_config()``) is stored as its config, a list of datalist entries as their case ids; every other
    value must be JSON data. Under torch.distributed only rank 0 writes.

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
        {"_target_": "dgst_monai.export.save_training_record", "ckpt_dir": "@ckpt_dir", "record": "@training_record"}
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


# ------------------------------------------------------------------------------------------------------------
# The model zoo's checks
# ------------------------------------------------------------------------------------------------------------


def _large_files(folder: Path) -> set[str]:
    """Bundle-relative paths that ``large_files.yml`` (or .yaml / .json) lists."""
    from monai.bundle import ConfigParser

    listed: set[str] = set()
    for name in ("large_files.yml", "large_files.yaml", "large_files.json"):
        if (folder / name).is_file():
            content = ConfigParser.load_config_file(str(folder / name)) or {}
            listed.update(str(item.get("path", "")).removeprefix("./") for item in content.get("large_files") or [])
    return listed


def _file_problems(folder: Path) -> list[str]:
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (folder / name).is_file()]
    large = _large_files(folder)
    if not (folder / "models" / "model.pt").is_file() and "models/model.pt" not in large:
        problems.append("no models/model.pt and no large_files.yml entry for it")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            problems.append(f"{rel} is a symbolic link (the model zoo zips the folder alone: copy the file)")
        elif path.is_file() and path.stat().st_size > MAX_FILE_BYTES and rel not in large:
            size = path.stat().st_size / 1e6
            problems.append(f"{rel} is {size:.1f} MB, over the model zoo's {MAX_FILE_BYTES / 1e6:.0f} MB per file")
    return problems


def _metadata_problems(metadata: Mapping[str, Any]) -> list[str]:
    problems = [f"metadata.json lacks {key!r}" for key in REQUIRED_METADATA if key not in metadata]
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        problems.append(f"metadata.json version {version!r} is not MAJOR.MINOR.PATCH")
    if not isinstance(changelog, Mapping) or version not in changelog:
        problems.append(f"metadata.json changelog has no entry for version {version!r}")
    formats = metadata.get("network_data_format", {})
    for kind in ("inputs", "outputs"):
        if not isinstance(formats, Mapping) or not formats.get(kind):
            problems.append(f"metadata.json network_data_format has no {kind}")
    return problems


def bundle_workflow(
    folder: str | os.PathLike[str], configs: str | Sequence[str], workflow_type: str, **overrides: Any
) -> ConfigWorkflow:
    """A MONAI ``ConfigWorkflow`` over ``configs/<name>.json`` of a bundle folder (the repository's, a copy, an
    unzipped export), with its ``metadata.json``, its ``logging.conf`` if it has one, and ``bundle_root`` set to
    the folder.

    Args:
        folder: the bundle folder.
        configs: config name(s) without ``.json``, merged in order (``["train", "finetune"]``).
        workflow_type: ``"train"``, ``"infer"`` or ``"eval"``.
        **overrides: config overrides, e.g. ``datalist=...``.

    Returns:
        The workflow, not yet initialised.

    Example::

        workflow = bundle_workflow("bundles/ln_ct_dynunet", ["train", "finetune"], "train", shots=2)
        workflow.initialize()
    """
    from monai.bundle import ConfigWorkflow

    root = Path(folder)
    names = [configs] if isinstance(configs, str) else list(configs)
    logging_file = root / "configs" / "logging.conf"
    return ConfigWorkflow(
        config_file=[str(root / "configs" / f"{name}.json") for name in names],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(logging_file) if logging_file.is_file() else None,
        workflow_type=workflow_type,
        bundle_root=str(root),
        **overrides,
    )


def verify_network(folder: str | os.PathLike[str], **overrides: Any) -> None:
    """``monai.bundle.verify_net_in_out`` as the model zoo's CI runs it: ``network_def`` of
    ``configs/inference.json`` on CPU, fed the smallest input ``metadata.json``'s ``network_data_format`` allows.

    Args:
        folder: the bundle folder.
        **overrides: config overrides, e.g. ``preset="tiny"``.

    Raises:
        BundleCheckError: the network's output does not match the metadata.

    Example::

        verify_network("bundles/ln_ct_dynunet", preset="tiny")
    """
    from monai.bundle import verify_net_in_out

    root = Path(folder)
    try:
        verify_net_in_out(
            net_id="network_def",
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            bundle_root=str(root),
            device="cpu",
            **overrides,
        )
    except ValueError as err:
        raise BundleCheckError(f"{root}: network_def does not match metadata.json network_data_format: {err}") from err


def verify_bundle(folder: str | os.PathLike[str], train_overrides: Mapping[str, Any] | None = None) -> None:
    """Run the model zoo's checks on a bundle folder, as its CI does.

    Files: ``LICENSE``, ``configs/metadata.json``, ``configs/train.json``, ``configs/inference.json``,
    ``docs/README.md``, ``models/model.pt`` (or a ``large_files.yml`` entry); no symbolic link; no file over
    25 MB unless ``large_files.yml`` lists it. Metadata: the specification's required fields, a
    ``MAJOR.MINOR.PATCH`` version listed in ``changelog``. Workflows: ``ConfigWorkflow(...).initialize()`` then
    ``check_properties()`` with nothing missing, for ``train`` and for ``infer`` (which instantiates them: the
    training datasets are loaded, and run outputs may appear in the folder, as in the zoo's CI). Network:
    ``monai.bundle.verify_net_in_out`` on ``network_def`` of the inference config. ``models/model.ts``, if
    present, must load. (The schema check itself, ``verify_metadata``, downloads the schema and is left out.)

    Args:
        folder: the bundle folder.
        train_overrides: config overrides for the train workflow only, e.g. ``{"datalist": "datalist.json"}``
            so that the check does not generate the bundle's default synthetic data.

    Raises:
        BundleCheckError: missing files, links, large files or metadata fields (all of them listed), missing
            workflow properties, or a network whose output does not match the metadata.

    Example::

        verify_bundle("unzipped/ln_ct_dynunet_site")
    """
    import torch
    from monai.bundle import ConfigParser

    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"bundle folder {root} does not exist")
    problems = _file_problems(root)
    if (root / "configs" / "metadata.json").is_file():
        problems += _metadata_problems(ConfigParser.load_config_file(str(root / "configs" / "metadata.json")))
    if problems:
        raise BundleCheckError(f"{root} fails the model zoo's checks:\n  " + "\n  ".join(problems))
    for config, workflow_type, overrides in (("train", "train", train_overrides or {}), ("inference", "infer", {})):
        workflow = bundle_workflow(root, config, workflow_type, **overrides)
        workflow.initialize()
        missing = workflow.check_properties()
        if missing:
            raise BundleCheckError(f"{root}/configs/{config}.json lacks the {workflow_type} properties {missing}")
    verify_network(root)
    if (root / "models" / "model.ts").is_file():
        torch.jit.load(str(root / "models" / "model.ts"), map_location="cpu")


# ------------------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------------------


def _overlay(root: Path, preset: str | None) -> dict[str, Any]:
    """The config overlay ``--preset`` stands for: a JSON file (``configs/<name>.json`` or a path), else the
    bundle's ``preset`` key (a network preset name such as ``cpu-small``)."""
    from monai.bundle import ConfigParser

    if preset is None:
        return {}
    candidates = [Path(preset).expanduser(), root / "configs" / f"{preset}.json"]
    for path in candidates:
        if path.suffix == ".json" and path.is_file():
            content = ConfigParser.load_config_file(str(path))
            if not isinstance(content, dict):
                raise ValueError(f"preset overlay {path} is not a JSON object")
            return content
    if preset.endswith(".json"):
        raise FileNotFoundError(f"preset overlay {preset} not found")
    return {"preset": preset}


def _merged(root: Path, config: str, overlay: Mapping[str, Any], only_known: bool) -> dict[str, Any]:
    """``configs/<config>.json`` (as written, not re-spelled by a parser) with ``overlay`` merged; with
    ``only_known`` just the overlay entries whose top-level key the config already has."""
    path = root / "configs" / f"{config}.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    for key, value in overlay.items():
        if not only_known or re.split(r"#|::", key.lstrip("+"))[0] in content:
            try:
                set_config_key(content, key, value)
            except (KeyError, IndexError, ValueError, TypeError):
                raise ValueError(f"preset overlay entry {key!r} does not fit {path}") from None
    return content


def _plan_config(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The plan a config builds, as a config component (``to_config()``)."""
    from monai.bundle import ConfigParser

    try:
        # a copy: the parser re-spells the ids of the content it is given (``a#b`` -> ``a::b``)
        plan = ConfigParser(copy.deepcopy(dict(config))).get_parsed_content("plan")
    except Exception as err:  # the preset name or the plan's arguments are wrong: say where
        raise ValueError(f"{source}: cannot build the network plan ({err})") from err
    if not hasattr(plan, "to_config"):
        raise ValueError(f"{source}: 'plan' is a {type(plan).__name__} without to_config(); expected a network plan")
    return plan.to_config()


def _with_plan(config: Mapping[str, Any], plan: Mapping[str, Any], others: str = "") -> dict[str, Any]:
    """``config`` with ``plan`` written out, and the keys that only fed the old plan expression removed
    (unless ``others``, the text of the configs merged with it, refers to them)."""
    out = dict(config)
    old = out.get("plan")
    out["plan"] = dict(plan)
    # the written plan component refers to ``@preset`` (and the SwinUNETR bundle's ``@swin_version``)
    inputs = re.findall(r"@([A-Za-z_][\w#]*)", old if isinstance(old, str) else json.dumps(old))
    params = out.get("experiment_param")
    if isinstance(params, dict):  # tracking keeps recording what the plan was made from, as a literal
        out["experiment_param"] = {
            k: (out[v[1:]] if isinstance(v, str) and v[1:] in inputs and v[1:] in out else v) for k, v in params.items()
        }
    text = json.dumps(out) + others
    for name in inputs:
        if name in out and not re.search(rf"@{re.escape(name)}(?![\w#])", text):
            del out[name]
    return out


def _read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """An evaluation ``summary.json``: ``{metric: {"mean", "std", ...}, "n_cases": n}``, checked."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"evaluation summary {file} does not exist (configs/evaluate.json writes <ckpt_dir>/eval/summary.json)"
        )
    summary = read_json(file, "evaluation summary")
    metrics = {k: v for k, v in summary.items() if isinstance(v, Mapping)} if isinstance(summary, dict) else {}
    n_cases = summary.get("n_cases") if isinstance(summary, dict) else None
    if not metrics or not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"evaluation summary {file}: expected {{metric: {{'mean', 'std'}}, 'n_cases': n >= 1}}")
    for name, values in metrics.items():
        for key in ("mean", "std"):
            value = values.get(key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"evaluation summary {file}: {name} {key} is {value!r}, not a finite number")
    return summary


def _data_name(datalist: Any) -> str:
    """A dataset's name for the changelog: its datalist's ``name``, else its folder's name (never a full path)."""
    path = Path(str(datalist))
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name = json.loads(path.read_text(encoding="utf-8")).get("name")
        if isinstance(name, str) and name:
            return name
    return path.parent.name if path.suffix == ".json" else path.name


def _training_text(record: Mapping[str, Any]) -> str:
    """What the record says about the run, in one sentence."""
    from dgst_monai.methods import get_method

    method = record.get("method")
    data = _data_name(record["datalist"]) if record.get("datalist") else "unrecorded data"
    cases = record.get("cases") or []
    if method is None:
        text = f"Pre-trained on {len(cases) or 'the'} training cases of {data}"
    else:
        try:
            label = get_method(method).label
        except ValueError:  # a method this installation does not know: its name says enough
            label = str(method)
        settings = [f"{k} {record[k]}" for k in ("gamma", "update", "grouping") if record.get(k) is not None]
        shots = record.get("shots", len(cases) or "?")
        text = f"Fine-tuned with {label}" + (f" ({', '.join(settings)})" if settings else "")
        text += f" from {shots} shots of {data}"
        if record.get("seed") is not None:
            text += f" (few-shot seed {record['seed']})"
    schedule = [f"{record[k]} {w}" for k, w in (("max_epochs", "epochs"), ("iterations_per_epoch", "iterations each"))
                if record.get(k) is not None]  # fmt: skip
    if schedule:
        text += f", {' x '.join(schedule)}"
    if record.get("learning_rate") is not None:
        text += f", learning rate {record['learning_rate']}"
    return text


def _evaluation_text(summary: Mapping[str, Any]) -> str:
    metrics = [f"{name} {v['mean']:.4f} +- {v['std']:.4f}" for name, v in summary.items() if isinstance(v, Mapping)]
    return f"mean +- std over {summary['n_cases']} test case(s): {', '.join(metrics)}"


def _next_version(current: Any) -> str:
    match = _VERSION.fullmatch(str(current))
    if match is None:
        raise ValueError(f"the source bundle's version {current!r} is not MAJOR.MINOR.PATCH; pass version=...")
    major, minor, patch = (int(g) for g in match.groups())
    return f"{major}.{minor}.{patch + 1}"


def _metadata(
    source: Mapping[str, Any],
    version: str,
    entry: str,
    summary: Mapping[str, Any] | None,
    evaluation: str | None,
    patch_size: list[int],
) -> dict[str, Any]:
    """The exported bundle's metadata: new version and changelog entry, its own metrics, current versions."""
    import monai
    import numpy
    import torch

    from dgst_monai import __version__

    if version in source.get("changelog", {}):
        raise ValueError(f"version {version} is already in the source bundle's changelog; pass a new version=...")
    out = dict(source)
    out["version"] = version
    out["changelog"] = {version: entry, **source.get("changelog", {})}
    # the versions this bundle's TorchScript and checks were made with
    out["monai_version"] = monai.__version__
    out["pytorch_version"] = torch.__version__.split("+")[0]
    out["numpy_version"] = numpy.__version__
    out["required_packages_version"] = {**source.get("required_packages_version", {}), "dgst-monai": __version__}
    if summary is None:  # the source's metrics describe another model
        out["eval_metrics"] = {}
        out["eval_metrics_details"] = f"Not evaluated at export (version {version})."
    else:
        out["eval_metrics"] = {f"mean_{k}": v["mean"] for k, v in summary.items() if isinstance(v, Mapping)}
        out["eval_metrics_details"] = (
            f"{_evaluation_text(summary)}, as written by configs/evaluate.json to {Path(str(evaluation)).name} "
            f"(version {version})."
        )
    # the sliding-window patch of this plan: what the network is fed, and what verify_net_in_out feeds it
    formats = json.loads(json.dumps(source.get("network_data_format", {})))
    for kind in ("inputs", "outputs"):
        for item in formats.get(kind, {}).values():
            item["spatial_shape"] = list(patch_size)
    out["network_data_format"] = formats
    return out


def _readme(source: str, version: str, entry: str) -> str:
    """The source README with a section on this export after its title."""
    section = (
        f"\n## This export (version {version})\n\n{entry}\n\n"
        "The network is fixed by these weights: `plan` in `configs/train.json` and `configs/inference.json` "
        "spells it out, and no `preset` applies. `models/model.pt` is the checkpoint (loaded by "
        "`configs/inference.json`), `models/model.ts` its TorchScript, `models/normalization.json` its CT "
        "normalisation.\n"
    )
    title, newline, rest = source.partition("\n")
    return title + newline + section + ("\n" + rest if rest.strip() else "")


def _large_files_yml(stage: Path, weights_url: str | None) -> str:
    """``large_files.yml``: the model files over the zoo's limit, with their md5 and address."""
    lines = [
        "# Files of this bundle fetched by `python -m monai.bundle download` (the model zoo's limit per file is",
        f"# {MAX_FILE_BYTES / 1e6:.0f} MB); the files below models/ that are not listed ship in the bundle itself.",
    ]
    large = [p for p in sorted((stage / "models").iterdir()) if p.stat().st_size > MAX_FILE_BYTES]
    if not large:
        return "\n".join([*lines, "large_files: []", ""])
    if not weights_url:
        names = ", ".join(f"models/{p.name} ({p.stat().st_size / 1e6:.0f} MB)" for p in large)
        raise ValueError(
            f"{names} exceed the model zoo's {MAX_FILE_BYTES / 1e6:.0f} MB per file: pass weights_url= "
            "(--weights_url) with the address where you will publish models/, to list them in large_files.yml"
        )
    lines.append("large_files:")
    for path in large:
        md5 = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324 - the hash type large_files.yml uses
        lines += [
            f'  - path: "models/{path.name}"',
            f'    url: "{weights_url.rstrip("/")}/{path.name}"',
            f'    hash_val: "{md5}"',
            '    hash_type: "md5"',
        ]
    return "\n".join([*lines, ""])


def _copy_source(root: Path, stage: Path) -> None:
    """The source bundle's files, without run outputs or preset overlays; links become files."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        here = Path(folder)
        skip = [n for n in names if (here == root and n in RUN_OUTPUTS) or n.startswith(".") or n == "__pycache__"]
        if here == root / "configs":
            skip += [n for n in names if n.endswith(".json") and _is_preset_overlay(here / n)]
        return skip

    shutil.copytree(root, stage, symlinks=False, ignore=ignore)


def _is_preset_overlay(path: Path) -> bool:
    """A config that sets ``preset``: it cannot apply to a bundle whose weights fix the network."""
    if path.stem in (*_NETWORK_CONFIGS, "metadata"):
        return False
    with contextlib.suppress(OSError, ValueError):
        return "preset" in json.loads(path.read_text(encoding="utf-8"))
    return False


def _inference_network(stage: Path) -> Any:
    """The inference config's ``network`` of the staged bundle, on the CPU, with its checkpoint loaded
    strictly."""
    from monai.bundle import ConfigParser

    from dgst_monai.networks.checkpoints import checkpoint_state

    parser = ConfigParser()
    parser.read_config(str(stage / "configs" / "inference.json"))
    parser["bundle_root"] = str(stage)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    try:
        network.load_state_dict(checkpoint_state(stage / "models" / "model.pt"))
    except RuntimeError as err:
        plan = {k: v for k, v in parser["plan"].items() if k != "_target_"}
        raise ValueError(
            f"the checkpoint does not fit the network it is exported with (plan {json.dumps(plan)[:300]}): "
            f"{str(err)[:400]} ... Pass the preset it was trained with (--preset), or export from the folder "
            "holding its training_record.json"
        ) from None
    return network.eval()


def _write_torchscript(stage: Path, input_shape: list[int]) -> str:
    """``models/model.ts`` by ``ckpt_export`` of the inference ``network``: scripted, else traced at
    ``input_shape``; checked against the checkpoint. Returns ``"scripted"`` or ``"traced"``."""
    import torch
    from monai.bundle import ckpt_export

    common = dict(
        net_id="network",  # the network with any modules the checkpoint adds (dgst_monai.networks.for_checkpoint)
        filepath=str(stage / "models" / "model.ts"),
        ckpt_file=str(stage / "models" / "model.pt"),
        meta_file=str(stage / "configs" / "metadata.json"),
        config_file=str(stage / "configs" / "inference.json"),
        bundle_root=str(stage),
        device="$torch.device('cpu')",
    )
    how = "scripted"
    try:
        ckpt_export(**common)
    except Exception as err:  # TorchScript's compiler raises many types; tracing is the documented fallback
        logger.info(f"scripting failed ({type(err).__name__}: {str(err)[:200]}); tracing at {input_shape}")
        ckpt_export(**common, use_trace=True, input_shape=list(input_shape))
        how = "traced"
    eager = _inference_network(stage)
    exported = torch.jit.load(str(stage / "models" / "model.ts"), map_location="cpu")
    # a trace is checked at batch 2, as the sliding window feeds it: the trace must not have fixed the batch size
    x = torch.randn((2 if how == "traced" else 1, *input_shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = eager(x), exported(x)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"models/model.ts ({how}) does not reproduce the checkpoint's output")
    return how


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dgst-monai-export-") as folder:
        yield Path(folder)


def _zip(stage: Path, output: Path) -> None:
    """Zip ``stage`` as ``<output>`` with the folder's name at the top, as the model zoo packs a bundle."""
    with atomic_open(output, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                archive.write(path, f"{stage.name}/{path.relative_to(stage).as_posix()}")


def export_bundle(
    bundle: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    preset: str | None = None,
    evaluation: str | os.PathLike[str] | None = None,
    version: str | None = None,
    changelog: str | None = None,
    weights_url: str | None = None,
    check_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint`` as a standalone bundle zip made from ``bundle``, after the model zoo's checks.

    Args:
        bundle: the source bundle folder (e.g. ``bundles/ln_ct_dynunet``), the one the checkpoint was trained
            or fine-tuned with.
        checkpoint: the model, e.g. ``tuned/model.pt`` (a state dict, or a training state with ``model``);
            ``normalization.json`` must lie beside it, ``training_record.json`` normally does.
        output: the zip to write, ``<name>.zip``; ``<name>`` (letters, digits, ``_``) is the bundle's folder name
            in the zip.
        preset: the network the checkpoint was trained with, if it has no training record: one of the
            bundle's overlay configs (``cpu_small``, or a path), merged into ``train.json`` and
            ``inference.json``, or a value of their ``preset`` key (``cpu-small``). With a record, it must agree.
        evaluation: the fine-tuned model's ``summary.json`` (from ``configs/evaluate.json``), for
            ``eval_metrics``; without it the exported metadata says the model was not evaluated.
        version: the exported bundle's version; default the source's with the patch number raised.
        changelog: the version's changelog entry; default written from the training record (needed without one).
        weights_url: where ``models/`` will be published, for files over the zoo's 25 MB limit (listed with
            their md5 in ``large_files.yml``); the zip contains them either way.
        check_overrides: config overrides for the train workflow's check, e.g. ``{"datalist": "datalist.json"}``
            (default: the bundle's own default data, generated in a scratch folder).

    Returns:
        The zip written.

    Raises:
        FileNotFoundError: missing bundle, checkpoint, normalisation, evaluation summary or preset overlay.
        ValueError: a bad output name, no way to write the changelog, a preset that disagrees with the record, a
            checkpoint that does not fit the network, files too large without ``weights_url``.
        BundleCheckError: the staged bundle fails the model zoo's checks.
        RuntimeError: the TorchScript model does not reproduce the checkpoint.

    Example::

        export_bundle("bundles/ln_ct_dynunet", "tuned/model.pt", "ln_ct_dynunet_site.zip",
                      evaluation="tuned/eval/summary.json")
    """
    import torch
    from monai.bundle import ConfigParser

    from dgst_monai import __version__
    from dgst_monai.bundle_variants import format_config
    from dgst_monai.networks.checkpoints import checkpoint_state
    from dgst_monai.normalization import NORMALIZATION_FILE, load_normalization

    root = Path(bundle).expanduser().resolve()
    for name in ("train", "inference", "metadata"):
        if not (root / "configs" / f"{name}.json").is_file():
            raise FileNotFoundError(f"{root} is not a bundle with configs/{name}.json")
    ckpt = Path(checkpoint).expanduser().resolve()
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    out = Path(output).expanduser().resolve()
    if out.suffix != ".zip" or not _BUNDLE_NAME.fullmatch(out.stem):
        raise ValueError(f"output {output} must be <name>.zip, <name> of letters, digits and _ (the bundle's name)")
    normalization = load_normalization(ckpt)
    record = load_training_record(ckpt)
    summary = _read_summary(evaluation) if evaluation is not None else None
    if summary is None:
        logger.warning(NO_EVALUATION)
    if record is None and changelog is None:
        raise ValueError(
            f"no {RECORD_FILE} beside {ckpt}, so the method, shots and data of this model are unknown: pass "
            "changelog=... (--changelog) and the preset it was trained with (--preset)"
        )

    overlay = _overlay(root, preset)
    configs = {
        "train": _merged(root, "train", overlay, only_known=False),
        "inference": _merged(root, "inference", overlay, only_known=True),
    }
    plan = _plan_config(configs["train"], f"{root}/configs/train.json" + (f" with preset {preset}" if preset else ""))
    if record is not None and record.get("plan") is not None:
        if preset is not None and record["plan"] != plan:
            raise ValueError(
                f"preset {preset} gives the network {plan}, but {ckpt.parent / RECORD_FILE} says the checkpoint was "
                f"trained with {record['plan']}: leave out --preset"
            )
        plan = record["plan"]
    source_meta = ConfigParser.load_config_file(str(root / "configs" / "metadata.json"))
    new_version = version or _next_version(source_meta.get("version"))
    entry = changelog or _training_text(record or {})
    entry += f". Exported from {root.name} {source_meta.get('version')} by dgst-monai {__version__}"
    if summary is not None:
        entry += f"; evaluation: {_evaluation_text(summary)}"
    raw = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint_state(raw)
    others = " ".join(p.read_text(encoding="utf-8") for p in (root / "configs").glob("*.json") if p.stem not in configs)

    with _scratch() as scratch:
        stage = scratch / out.stem
        _copy_source(root, stage)
        for name, config in configs.items():
            atomic_write(stage / "configs" / f"{name}.json", format_config(_with_plan(config, plan, others)))
        models = stage / "models"
        models.mkdir()
        if state is raw:
            shutil.copyfile(ckpt, models / "model.pt")
        else:  # a training state: its model entry, flat, as the bundles' FinalModelSaver writes model.pt
            atomic_torch_save(dict(state), models / "model.pt")
        atomic_write_json(models / NORMALIZATION_FILE, normalization)
        _large_files_yml(stage, weights_url)  # a model too large for the zoo fails here, before the slow steps
        infer = ConfigParser(copy.deepcopy(_with_plan(configs["inference"], plan, others)))
        patch = [int(v) for v in infer.get_parsed_content("plan").patch_size]
        channels = int(infer.get_parsed_content("in_channels")) if "in_channels" in infer else 1
        metadata = _metadata(source_meta, new_version, entry, summary, evaluation, patch)
        atomic_write(stage / "configs" / "metadata.json", format_config(metadata))
        _inference_network(stage)  # the checkpoint fits, before the slower steps
        how = _write_torchscript(stage, [1, channels, *patch])
        readme = stage / "docs" / "README.md"
        source_readme = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {metadata.get('name', out.stem)}\n"
        atomic_write(readme, _readme(source_readme, new_version, entry + f". models/model.ts is {how}."))
        atomic_write(stage / "large_files.yml", _large_files_yml(stage, weights_url))

        check = scratch / "check" / out.stem  # the checks may write run outputs: not into the bundle
        shutil.copytree(stage, check)
        verify_bundle(check, check_overrides)
        _zip(stage, out)
    logger.info(f"exported {ckpt} as bundle {out.stem} version {new_version} to {out}")
    return out
