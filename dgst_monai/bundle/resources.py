"""The folders shipped with the package: the MONAI bundles and the dataset cards, found by one rule.

The repository's top-level ``bundles/`` and ``data_manifests/`` are the package data ``dgst_monai.bundles`` and
``dgst_monai.data_manifests`` (``pyproject.toml`` maps the folders onto these names). :func:`shipped_dir` asks
the import system where those names live, and nothing else: after ``pip install .`` (or a wheel) they are the
copies in ``site-packages/dgst_monai/``; after ``pip install -e .`` they are the checkout's own folders, so an
edit there takes effect at once. The current working directory plays no part.

Example:
    >>> from dgst_monai.bundle.resources import bundle_dir, shipped_dir
    >>> (bundle_dir("ln_ct_dynunet") / "configs" / "train.json").is_file()
    True
    >>> sorted(p.name for p in shipped_dir("data_manifests").glob("*.json"))[0]
    'lnq2023.json'
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

__all__ = ["SHIPPED", "bundle_dir", "bundle_names", "find_bundle", "shipped_dir"]

#: The shipped folders, by their name in the repository.
SHIPPED: tuple[str, ...] = ("bundles", "data_manifests")

#: The file that makes a folder of ``bundles/`` a bundle (MONAI's ``ConfigWorkflow`` reads it first).
_BUNDLE_MARKER = Path("configs") / "metadata.json"


def shipped_dir(name: Literal["bundles", "data_manifests"]) -> Path:
    """The folder of the package data ``dgst_monai.<name>``.

    Args:
        name: ``bundles`` or ``data_manifests``.

    Raises:
        ValueError: ``name`` is not a shipped folder.
        FileNotFoundError: the installed package lacks the folder (an install made before it was package data:
            reinstall with ``pip install .`` or ``pip install -e .``).
    """
    if name not in SHIPPED:
        raise ValueError(f"{name!r} is not shipped with dgst_monai; shipped folders: {', '.join(SHIPPED)}")
    spec = importlib.util.find_spec(f"dgst_monai.{name}")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if len(locations) != 1 or not Path(locations[0]).is_dir():
        raise FileNotFoundError(
            f"the installed dgst_monai has no {name}/ package data (found {locations or 'nothing'}); reinstall it "
            "from the repository: pip install .   (or pip install -e . for development)"
        )
    return Path(locations[0])


def bundle_names() -> list[str]:
    """Names of the shipped bundles (folders of ``bundles/`` with ``configs/metadata.json``), sorted."""
    return sorted(p.name for p in shipped_dir("bundles").iterdir() if (p / _BUNDLE_MARKER).is_file())


def bundle_dir(name: str = "ln_ct_dynunet") -> Path:
    """The folder of the shipped bundle ``name``.

    Raises:
        FileNotFoundError: no shipped bundle of that name (the message lists the shipped ones).
    """
    path = shipped_dir("bundles") / name
    if not (path / _BUNDLE_MARKER).is_file():
        raise FileNotFoundError(f"no shipped bundle {name!r} in {path.parent}; shipped: {', '.join(bundle_names())}")
    return path


def find_bundle(bundle: str | os.PathLike[str]) -> Path:
    """A bundle given on the command line: an existing folder, else the name of a shipped bundle.

    ``bundles/ln_ct_dynunet`` in a checkout and plain ``ln_ct_dynunet`` after ``pip install`` both work.

    Raises:
        FileNotFoundError: neither a folder nor a shipped bundle's name.
    """
    path = Path(bundle).expanduser()
    if path.is_dir():
        return path.resolve()
    if len(path.parts) == 1:
        return bundle_dir(path.name)
    raise FileNotFoundError(
        f"bundle {bundle} is not a folder; pass a bundle folder or the name of a shipped bundle "
        f"({', '.join(bundle_names())})"
    )
