"""Copies of a bundle for tests that run it as a user would, from its own folder (``models/`` and ``eval/``
written inside the copy), with the shipped configs only."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bundle_support import BUNDLES

#: The seed step of the bundles' ``initialize`` (what is left when a test drops the bundle checks before it).
SEED = "$monai.utils.set_determinism(seed=@seed)"


def copy_bundle(dest: Path, bundle: str = "ln_ct_dynunet") -> Path:
    """A copy of a bundle's own files (configs, docs) in ``dest``; returns the copy's root."""
    root = dest / bundle
    shutil.copytree(BUNDLES / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return root


def config_list(root: Path, *names: str) -> list[str]:
    """``configs/<name>.json`` of the copy at ``root``, in the order MONAI is to merge them."""
    return [str(root / "configs" / f"{name}.json") for name in names]


def make_workflow(root: Path, names: list[str], **overrides: Any) -> Any:
    """A MONAI ``ConfigWorkflow`` (train) over ``configs/<name>.json`` of the copy at ``root`` with the tiny run
    every such test uses (tiny preset, no workers, no AMP, one iteration of one epoch)."""
    from monai.bundle import ConfigWorkflow

    run = {"preset": "tiny", "num_workers": 0, "amp": False, "max_epochs": 1, "iterations_per_epoch": 1}
    return ConfigWorkflow(
        config_file=config_list(root, *names),
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        **{**run, **overrides},
    )
