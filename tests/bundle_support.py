"""Helpers of the bundle tests: bundle paths, tiny-network overrides and a ConfigWorkflow runner.

The overrides shrink networks, patches and runs so that every workflow of both bundles finishes in seconds on
a CPU; the wiring under test is the bundles' own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from helpers import REPO, bundle_workflow, run_checked
from monai.bundle import ConfigParser, ConfigWorkflow

from dgst_monai.normalization import save_normalization

BUNDLES = REPO / "bundles"
BUNDLE_NAMES = ("ln_ct_dynunet", "ln_ct_swinunetr")

#: The tiny preset of each bundle's network (dgst_monai.networks PRESETS / SWINUNETR_PRESETS), for train and
#: inference alike.
TINY_NETWORK: dict[str, dict[str, Any]] = {name: {"preset": "tiny"} for name in BUNDLE_NAMES}

#: A training run of one iteration with batch 1 (validation after it, on one held-out case).
TINY_RUN: dict[str, Any] = {
    "batch_size": 1,
    "num_workers": 0,
    "iterations_per_epoch": 1,
    "max_epochs": 1,
    "val_interval": 1,
    "num_validation": 1,
    "amp": False,
}


def make_workflow(bundle: str, names: list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    """A MONAI ``ConfigWorkflow`` over ``names`` of the repository's ``bundle`` (:func:`helpers.bundle_workflow`)."""
    return bundle_workflow(BUNDLES / bundle, names, workflow_type, **overrides)


def run_like_model_zoo(bundle: str, names: list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    """What the model-zoo CI does with a workflow: initialize, check_properties (none missing), run, finalize."""
    return run_checked(make_workflow(bundle, names, workflow_type, **overrides))


def save_tiny_checkpoint(folder: Path, normalization: dict[str, float]) -> Path:
    """A randomly initialised (seed 0) tiny ``ln_ct_dynunet`` checkpoint in ``folder``, with its normalisation."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "ln_ct_dynunet" / "configs" / "train.json"))
    for key, value in TINY_NETWORK["ln_ct_dynunet"].items():
        parser[key] = value
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    save_normalization(folder, normalization)
    return folder / "model.pt"
