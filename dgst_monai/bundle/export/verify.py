"""The model zoo's checks of a bundle folder, as its CI runs them: files, metadata, workflows and network.

:func:`verify_bundle` runs them all on a folder (the repository's bundle, a copy, an unzipped export);
``dgst-monai export`` runs them on a copy of the staged bundle before it zips it. :func:`bundle_workflow` is the
MONAI ``ConfigWorkflow`` of a bundle folder that the checks (and the tests) initialise.

Example::

    from dgst_monai.bundle.export.verify import verify_bundle

    verify_bundle("unzipped/ln_ct_dynunet_site")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monai.bundle import ConfigWorkflow

__all__ = [
    "MAX_FILE_BYTES",
    "REQUIRED_FILES",
    "REQUIRED_METADATA",
    "BundleCheckError",
    "bundle_workflow",
    "verify_bundle",
    "verify_network",
]

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
#: A bundle version: MAJOR.MINOR.PATCH.
VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class BundleCheckError(ValueError):
    """A bundle folder fails the model zoo's checks; the message lists every problem found."""


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
    if not isinstance(version, str) or not VERSION.fullmatch(version):
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

