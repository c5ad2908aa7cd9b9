"""Staging an export: the exported bundle's folder, written from the source bundle and the checkpoint.

:func:`read_export_source` reads and checks everything an export needs (the source bundle's configs with a
``--preset`` overlay merged, the network plan from the training record or the preset, the checkpoint's CT
normalisation, the evaluation summary, the new version and its changelog entry) before anything is written;
:func:`stage_bundle` then writes the bundle folder: ``configs/`` with the plan written out, ``models/model.pt``,
``models/normalization.json``, ``models/model.ts`` (TorchScript, checked against the checkpoint), the new
``metadata.json``, ``docs/README.md`` with a section on the export and ``large_files.yml``.

Example::

    source = read_export_source("bundles/ln_ct_dynunet", "tuned/model.pt", "ln_ct_dynunet_site")
    stage_bundle(source, Path("scratch/ln_ct_dynunet_site"))
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgst_monai.bundle.config_values import set_config_key
from dgst_monai.bundle.export.verify import MAX_FILE_BYTES, VERSION
from dgst_monai.bundle.record import RECORD_FILE, load_training_record
from dgst_monai.files import atomic_torch_save, atomic_write, atomic_write_json, read_json

__all__ = ["NO_EVALUATION", "RUN_OUTPUTS", "ExportSource", "read_export_source", "stage_bundle"]

logger = logging.getLogger(__name__)
#: said whenever a bundle is exported without an evaluation summary
NO_EVALUATION = (
    "no evaluation given: the exported bundle carries no eval_metrics (its metadata says 'Not evaluated at "
    "export'); pass --evaluation <ckpt_dir>/eval/summary.json (written by configs/evaluate.json) to include them"
)
#: Run outputs in a bundle folder (datasets, checkpoints, evaluations): never part of an exported bundle.
RUN_OUTPUTS = ("data", "models", "eval")
#: The configs an export rewrites; every other file is copied as it is.
_NETWORK_CONFIGS = ("train", "inference")


@dataclass(frozen=True)
class ExportSource:
    """What an export is made of, read and checked before anything is written (:func:`read_export_source`)."""

    #: the source bundle folder
    root: Path
    checkpoint: Path
    #: ``train`` and ``inference`` of the source, the ``--preset`` overlay merged
    configs: dict[str, dict[str, Any]]
    #: the network the checkpoint was trained with, as a config component
    plan: dict[str, Any]
    #: the text of the source's other configs: keys they refer to stay in the rewritten configs
    others: str
    normalization: dict[str, float]
    #: the source's ``metadata.json``
    metadata: dict[str, Any]
    #: the exported bundle's version and its changelog entry
    version: str
    entry: str
    summary: dict[str, Any] | None
    evaluation: str | os.PathLike[str] | None


def read_export_source(
    bundle: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    *,
    preset: str | None = None,
    evaluation: str | os.PathLike[str] | None = None,
    version: str | None = None,
    changelog: str | None = None,
) -> ExportSource:
    """Read and check what exporting ``checkpoint`` from ``bundle`` needs (arguments as
    :func:`dgst_monai.bundle.export.export_bundle`'s).

    Raises:
        FileNotFoundError: missing bundle, checkpoint, normalisation, evaluation summary or preset overlay.
        ValueError: no way to write the changelog, a preset that disagrees with the record.
    """
    from monai.bundle import ConfigParser

    from dgst_monai import __version__
    from dgst_monai.normalization import load_normalization

    root = Path(bundle).expanduser().resolve()
    for name in ("train", "inference", "metadata"):
        if not (root / "configs" / f"{name}.json").is_file():
            raise FileNotFoundError(f"{root} is not a bundle with configs/{name}.json")
    ckpt = Path(checkpoint).expanduser().resolve()
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
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
    metadata = ConfigParser.load_config_file(str(root / "configs" / "metadata.json"))
    entry = changelog or _training_text(record or {})
    entry += f". Exported from {root.name} {metadata.get('version')} by dgst-monai {__version__}"
    if summary is not None:
        entry += f"; evaluation: {_evaluation_text(summary)}"
    others = [p.read_text(encoding="utf-8") for p in (root / "configs").glob("*.json") if p.stem not in configs]
    return ExportSource(
        root=root,
        checkpoint=ckpt,
        configs=configs,
        plan=_recorded_plan(record, plan, preset, ckpt),
        others=" ".join(others),
        normalization=normalization,
        metadata=metadata,
        version=version or _next_version(metadata.get("version")),
        entry=entry,
        summary=summary,
        evaluation=evaluation,
    )


def _recorded_plan(
    record: Mapping[str, Any] | None, plan: dict[str, Any], preset: str | None, ckpt: Path
) -> dict[str, Any]:
    """The plan of the training record if it has one (a ``preset`` must agree with it), else ``plan``."""
    if record is None or record.get("plan") is None:
        return plan
    if preset is not None and record["plan"] != plan:
        raise ValueError(
            f"preset {preset} gives the network {plan}, but {ckpt.parent / RECORD_FILE} says the checkpoint was "
            f"trained with {record['plan']}: leave out --preset"
        )
    return dict(record["plan"])


def stage_bundle(source: ExportSource, stage: Path, weights_url: str | None = None) -> None:
    """Write the exported bundle's folder ``stage`` (created; its name is the bundle's).

    Raises:
        ValueError: a checkpoint that does not fit the network, files too large without ``weights_url``.
        RuntimeError: the TorchScript model does not reproduce the checkpoint.
    """
    from monai.bundle import ConfigParser

    from dgst_monai.bundle.variants import format_config

    _copy_source(source.root, stage)
    configs = {name: _with_plan(config, source.plan, source.others) for name, config in source.configs.items()}
    for name, config in configs.items():
        atomic_write(stage / "configs" / f"{name}.json", format_config(config))
    _write_models(source, stage / "models")
    _large_files_yml(stage, weights_url)  # a model too large for the zoo fails here, before the slow steps
    infer = ConfigParser(copy.deepcopy(configs["inference"]))
    patch = [int(v) for v in infer.get_parsed_content("plan").patch_size]
    channels = int(infer.get_parsed_content("in_channels")) if "in_channels" in infer else 1
    metadata = _metadata(source.metadata, source.version, source.entry, source.summary, source.evaluation, patch)
    atomic_write(stage / "configs" / "metadata.json", format_config(metadata))
    _inference_network(stage)  # the checkpoint fits, before the slower steps
    how = _write_torchscript(stage, [1, channels, *patch])
    readme = stage / "docs" / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {metadata.get('name', stage.name)}\n"
    atomic_write(readme, _readme(text, source.version, source.entry + f". models/model.ts is {how}."))
    atomic_write(stage / "large_files.yml", _large_files_yml(stage, weights_url))


def _write_models(source: ExportSource, models: Path) -> None:
    """``model.pt`` (a training state's model entry, flat, as the bundles' FinalModelSaver writes it) and
    ``normalization.json``."""
    import torch

    from dgst_monai.networks.checkpoints import checkpoint_state
    from dgst_monai.normalization import NORMALIZATION_FILE

    models.mkdir()
    raw = torch.load(source.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    state = checkpoint_state(raw)
    if state is raw:
        shutil.copyfile(source.checkpoint, models / "model.pt")
    else:
        atomic_torch_save(dict(state), models / "model.pt")
    atomic_write_json(models / NORMALIZATION_FILE, source.normalization)


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
    match = VERSION.fullmatch(str(current))
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

