"""Bundle changes of issue 12 that the bundles' JSON is to carry, as overlay config files for the tests.

The tests of resume-after-kill, damaged inputs and boolean overrides run ``bundles/ln_ct_dynunet`` with these
overlays appended to its config list (MONAI merges config files in order; ``a#b#0`` ids replace one element).
Once ``train.json`` / ``finetune.json`` / ``evaluate.json`` / ``inference.json`` carry the same keys, the overlays
change nothing and can be dropped (``config_list`` then lists the configs alone). Each key, in order:

- ``image_reader``: the SimpleITK reader for training too, which refuses truncated / corrupt files (MONAI's
  default NIfTI reader decodes a corrupt gzip stream unchecked, and names no file when one is cut short);
- ``train#sampler`` and the data loader: one pass over the data per epoch (``num_samples`` = iterations x
  batch size), so that a run resumed at an epoch boundary draws the same batches (``multi_gpu_train.json``
  replaces ``train#sampler`` by its ``DistributedSampler`` as before);
- ``training_state#random``: the random streams (torch, numpy, Python, the augmentations' own) in the state;
- ``train#handlers#0#resume``, ``...#amp``, ``inferer#enabled``: booleans through ``config_values.flag``;
- ``train#handlers#4``: the atomic final-model saver instead of MONAI's ``CheckpointSaver``;
- ``initialize``: the checks before long work (:mod:`dgst_monai.preflight`: misspelt overrides, output folder,
  datalist), then the seed;
- fine-tuning: the foundation loader with the same flag and :class:`SafeCheckpointLoader`, the size prior flag.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bundle_support import BUNDLES

FLAG = "dgst_monai.config_values.flag"

#: train.json's initialize with the checks before long work in front (dgst_monai.preflight)
PREFLIGHT = [
    "$dgst_monai.preflight.check_command_line()",
    "$dgst_monai.preflight.check_output_folder(@ckpt_dir)",
    "$dgst_monai.preflight.check_training_data(@datalist, @out_channels)",
]
SEED = "$monai.utils.set_determinism(seed=@seed)"

PENDING_TRAIN: dict[str, Any] = {
    "+imports": ["$import dgst_monai.config_values", "$import dgst_monai.preflight"],
    "initialize": [*PREFLIGHT, SEED],
    "image_reader": "dgst_monai.data.readers.SimpleITKReader",
    "train#sampler": {
        "_target_": "torch.utils.data.RandomSampler",
        "data_source": "@train#dataset",
        "num_samples": "$@iterations_per_epoch * @batch_size",
    },
    "train#dataloader#sampler": "@train#sampler",
    "train#dataloader#shuffle": False,
    "training_state#random": {
        "_target_": "dgst_monai.handlers.random_state.RandomState",
        "sources": ["@train#dataloader"],
    },
    "train#handlers#0#resume": f"${FLAG}(@resume, 'resume')",
    "train#handlers#4": {
        "_target_": "dgst_monai.handlers.final_checkpoint.FinalModelSaver",
        "save_dir": "@ckpt_dir",
        "save_dict": {"model": "@final_model"},
        "filename": "model.pt",
        "_disabled_": "$not @main_process",
    },
    "train#trainer#amp": f"${FLAG}(@amp, 'amp')",
    "validate#evaluator#amp": f"${FLAG}(@amp, 'amp')",
    "inferer#enabled": f"${FLAG}(@mirror, 'mirror')",
}

PENDING_FINETUNE: dict[str, Any] = {
    "train#handlers#5#_target_": "dgst_monai.handlers.checkpoint_loader.SafeCheckpointLoader",
    "train#handlers#5#_disabled_": (
        f"${FLAG}(@resume, 'resume') or not dgst_monai.get_method(@method).from_pretrained"
    ),
    "size_prior_handler#_disabled_": f"$not {FLAG}(@size_prior, 'size_prior')",
    "size_prior_handler#unlabeled#dataset#data": (
        f"$dgst_monai.data.unlabeled.unlabeled_cases(@training_cases, @shot_cases) if {FLAG}(@size_prior, "
        "'size_prior') else []"
    ),
    "size_prior_handler#target_fraction": (
        f"$dgst_monai.handlers.support_fraction(@shot_cases, reader=@image_reader) if {FLAG}(@size_prior, "
        "'size_prior') else None"
    ),
}

PENDING_EVALUATE: dict[str, Any] = {
    "handlers#0#_target_": "dgst_monai.handlers.checkpoint_loader.SafeCheckpointLoader",
    "evaluator#amp": f"${FLAG}(@amp, 'amp')",
}

PENDING_INFERENCE: dict[str, Any] = {
    "+imports": ["$import dgst_monai.config_values", "$import dgst_monai.preflight"],
    "initialize": ["$dgst_monai.preflight.check_command_line()", "$setattr(torch.backends.cudnn, 'benchmark', True)"],
    "handlers#0#_target_": "dgst_monai.handlers.checkpoint_loader.SafeCheckpointLoader",
    "evaluator#amp": f"${FLAG}(@amp, 'amp')",
    "inferer#enabled": f"${FLAG}(@mirror, 'mirror')",
}

OVERLAYS = {"train": PENDING_TRAIN, "finetune": PENDING_FINETUNE, "evaluate": PENDING_EVALUATE, "inference": PENDING_INFERENCE}


def copy_bundle(dest: Path, bundle: str = "ln_ct_dynunet") -> Path:
    """A copy of a bundle's own files (configs, docs) in ``dest``, with each overlay written beside its config as
    ``configs/pending_<name>.json``; returns the copy's root."""
    root = dest / bundle
    shutil.copytree(BUNDLES / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    for name, overlay in OVERLAYS.items():
        (root / "configs" / f"pending_{name}.json").write_text(json.dumps(overlay, indent=2), encoding="utf-8")
    return root


def config_list(root: Path, *names: str) -> list[str]:
    """``configs/<name>.json`` of the copy at ``root``, each followed by its pending overlay."""
    files: list[str] = []
    for name in names:
        files.append(str(root / "configs" / f"{name}.json"))
        if name in OVERLAYS:
            files.append(str(root / "configs" / f"pending_{name}.json"))
    return files


def make_workflow(root: Path, names: list[str], **overrides: Any) -> Any:
    """A MONAI ``ConfigWorkflow`` (train) over ``configs/<name>.json`` of the copy at ``root`` with the overlays
    and the tiny run every such test uses (tiny preset, no workers, no AMP, one iteration of one epoch)."""
    from monai.bundle import ConfigWorkflow

    run = {"preset": "tiny", "num_workers": 0, "amp": False, "max_epochs": 1, "iterations_per_epoch": 1}
    return ConfigWorkflow(
        config_file=config_list(root, *names),
        meta_file=str(root / "configs" / "metadata.json"),
        workflow_type="train",
        bundle_root=str(root),
        **{**run, **overrides},
    )
