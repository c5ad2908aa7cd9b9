"""The shipped bundles from one source: ``ln_ct_swinunetr`` is ``ln_ct_dynunet`` with another network.

The model zoo zips each bundle folder alone and MONAI Label copies one bundle into its app, so every bundle
folder must be complete (no links into a sibling). ``bundles/ln_ct_dynunet`` is the hand-written source;
:data:`VARIANTS` says, per file, what another bundle changes (config keys, in MONAI's ``a#b`` id syntax, and
a few documentation lines); :func:`write_variant` writes the variant's folder, which is committed and checked
by a test that regenerates it and compares.

Each bundle's network is written out in its ``train.json`` and ``inference.json`` as the ``plan`` component
(:func:`plan_component`), generated from the planner's ``paper`` preset (:func:`bundle_plans`); ``--preset``
swaps it for another preset's. :func:`write_variants` writes the source bundle's plan too, so the same test
checks that the written topology is the planner's.

Regenerate after changing the source bundle or the planner::

    python -m dgst_monai.bundle.variants bundles
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from dgst_monai.bundle.config_values import set_config_key

__all__ = [
    "PLAN_CONFIGS",
    "SOURCE_BUNDLE",
    "VARIANTS",
    "bundle_plans",
    "format_config",
    "plan_component",
    "write_plan",
    "write_variant",
    "write_variants",
]

SOURCE_BUNDLE = "ln_ct_dynunet"
#: The configs of a bundle that build its network from ``plan``.
PLAN_CONFIGS = ("configs/train.json", "configs/inference.json")

_SWIN_DESCRIPTION = (
    "MONAI SwinUNETR (v1; v2 with --swin_version v2) that segments lymph nodes in CT. Pre-trained on a "
    "head-and-neck cohort (RADCURE in the paper; the embedded synthetic head-and-neck CT by default) with the same "
    "nnU-Net-style recipe as the DynUNet bundle, and fine-tuned from a few annotated scans with Dynamic Gradient "
    "Sparsification Training (DGST) or any baseline of the paper."
)

#: variant bundle -> file (relative to the bundle) -> changes. JSON files take ``{"id#path": value}``
#: (:func:`dgst_monai.bundle.config_values.set_config_key`); Markdown files take ``{"old text": "new text"}``
#: replacements, each of which must match exactly once.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "ln_ct_swinunetr": {
        "configs/train.json": {"swin_version": "v1"},
        "configs/inference.json": {"swin_version": "v1"},
        "configs/metadata.json": {
            "version": "0.9.0",
            "changelog": {
                "0.9.0": "The network written out in train.json and inference.json as the plan component, lean "
                "configs, one fine-tuning handler (FineTuningHandler) and clip_grad_norm in finetune.json, the bundle "
                "code as dgst_monai.bundle.<module>, one normalizer for evaluate.json and inference.json, as "
                "ln_ct_dynunet 0.10.0; --preset keeps the written swin_version",
                "0.8.0": "output_format setting of inference.json (nifti, dicom-seg, rtstruct) and the patch_size check "
                "(every axis a multiple of 32), as ln_ct_dynunet 0.9.0",
                "0.7.0": "orientation setting and nnU-Net's window places, as ln_ct_dynunet 0.8.0",
                "0.6.0": "compile setting of inference.json and train.json, as ln_ct_dynunet 0.7.0 "
                "(torch.compile of the network, off by default)",
                "0.5.0": "resampling setting of inference.json, as ln_ct_dynunet 0.6.0 (\"nnunet\": nnU-Net v2's rule "
                "for imported models); the prediction is resampled back as logits, before the softmax",
                "0.4.0": "precision setting, as ln_ct_dynunet 0.5.0 (bfloat16 / float16 autocast of the network's "
                "forward passes on any device; float32 weights, loss and gradients), nnU-Net's window weights and spread, "
                "handlers named dgst_monai.handlers.<Class>, cpu_small pre-trains 40 epochs; eval_metrics emptied: they "
                "were the DynUNet bundle's",
                "0.3.0": "Reliability, as ln_ct_dynunet 0.4.0: random streams in the training state and one seeded "
                "RandomSampler pass per epoch (bit-identical resume), atomic model.pt, weights_only loading with "
                "key/shape checks, SimpleITK reader for training, yes/no boolean overrides, checks in initialize",
                "0.2.0": "Generated from ln_ct_dynunet (one source for both bundles); topology from the "
                "dgst_monai presets; fine-tuning keeps the foundation's intensity normalisation",
                "0.1.0": "First version: SwinUNETR counterpart of ln_ct_dynunet (same training, fine-tuning, "
                "evaluation, inference and multi-GPU wiring)",
            },
            "required_packages_version#einops": "0.8.2",
            "name": "CT lymph node segmentation foundation model (SwinUNETR)",
            "description": _SWIN_DESCRIPTION,
            "network_data_format#inputs#image#spatial_shape": ["64*n", "64*n", "64*n"],
            "network_data_format#outputs#pred#spatial_shape": ["64*n", "64*n", "64*n"],
            # measured on this network with the DynUNet bundle's recipe (its figures say nothing about SwinUNETR)
            "eval_metrics": {"mean_dice": 0.8663, "mean_nsd_1mm": 0.8698},
            "eval_metrics_details": "SYNTHETIC DATA ONLY, not a measure of clinical performance. Mean over the 4 test "
            "cases of the embedded synthetic head-and-neck CT (dgst_monai phantoms, 20 cases, dataset seed 0; std DSC "
            "0.029, NSD 0.018), DSC and NSD at 1 mm computed by configs/evaluate.json in the original image space, for "
            "the cpu-small preset (feature size 12) pre-trained on the 14 remaining training cases (configs/train.json "
            "+ configs/cpu_small.json: 40 epochs x 25 iterations, batch 2, no validation; 116 min with 1 thread on a "
            "2-core CPU shared with other runs). Paper (nnU-Net on RADCURE, internal validation): Dice 0.8172.",
        },
        "docs/README.md": {
            "# CT lymph node segmentation foundation model (DynUNet), few-shot adaptable with DGST": (
                "# CT lymph node segmentation foundation model (SwinUNETR), few-shot adaptable with DGST"
            ),
            "| network | DynUNet in nnU-Net's layout (`--preset paper`), 6 stages, filters 32-64-128-256-320-320, "
            "kernels 3x3x1 then 3x3x3, strides as nnU-Net plans them for 0.8 x 0.8 x 2.5 mm, a bias in every conv and "
            "transposed conv, instance norm with affine, 3 extra deep-supervision heads |": (
                "| network | SwinUNETR v1 (v2 with `--swin_version v2`), feature size 48, depths 2-2-2-2, patch 224 x 128 x 64 "
                "(multiples of 32), no deep supervision |"
            ),
            "* `metadata.json` `eval_metrics`: DSC 0.853 (std 0.025) and NSD@1mm 0.837 (std 0.038), mean over the 4 test\n"
            "  cases of the **synthetic** head-and-neck phantoms, evaluated in the original image space, for the CPU preset\n"
            "  pre-trained on the 14 other training phantoms (40 epochs x 25 iterations, 13 min on a 2-core CPU; see\n"
            "  `eval_metrics_details`). A check that the pipeline learns, not a measure of clinical performance.": (
                "* `metadata.json` `eval_metrics`: DSC 0.866 (std 0.029) and NSD@1mm 0.870 (std 0.018), mean over the 4\n"
                "  test cases of the **synthetic** head-and-neck phantoms, evaluated in the original image space, for the\n"
                "  cpu-small preset pre-trained on the 14 other training phantoms (40 epochs x 25 iterations; see\n"
                "  `eval_metrics_details`). A check that the pipeline learns, not a measure of clinical performance."
            ),
            "This bundle's network: `DynUNet` in nnU-Net's layout.": (
                "This bundle's network: MONAI's `SwinUNETR` (v1; `--swin_version v2` for v2), presets in "
                "`dgst_monai.networks.SWINUNETR_PRESETS` (paper: feature size 48, patch 224 x 128 x 64)."
            ),
        },
    },
}


def plan_component(plan: Any, **references: str) -> dict[str, Any]:
    """``plan`` as a bundle config writes it: the fields of its ``to_config()`` built by ``from_config``, which
    puts the plan of ``--preset`` (the config's ``preset`` key) in place of the written one when a preset is named.

    Args:
        plan: a ``DynUNetPlan`` or ``SwinUNETRPlan``.
        **references: fields given by another config key instead of their value (``version="@swin_version"``).

    Example::

        plan_component(plan_preset("paper"))["_target_"]  # "dgst_monai.networks.planner.DynUNetPlan.from_config"
    """
    fields = plan.to_config()
    target = fields.pop("_target_")
    return {"_target_": f"{target}.from_config", "preset": "@preset", **fields, **references}


def bundle_plans() -> dict[str, dict[str, Any]]:
    """The ``plan`` component of each shipped bundle: the planner's ``paper`` preset of its network."""
    from dgst_monai.networks.planner import plan_preset
    from dgst_monai.networks.swinunetr import swinunetr_plan

    return {
        SOURCE_BUNDLE: plan_component(plan_preset("paper")),
        "ln_ct_swinunetr": plan_component(swinunetr_plan("paper"), version="@swin_version"),
    }


def format_config(content: Any, width: int = 118) -> str:
    """JSON as the bundles write it: 4-space indent, lists and objects kept on one line when they fit."""

    def render(value: Any, indent: int, prefix: int = 0) -> str:
        # prefix: characters already on the line (the key), counted only for the fit
        flat = json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (dict, list)) or not value or indent + prefix + len(flat) <= width:
            return flat
        pad, inner = " " * indent, " " * (indent + 4)
        if isinstance(value, dict):
            items = [f"{inner}{json.dumps(k)}: {render(v, indent + 4, len(json.dumps(k)) + 2)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + f"\n{pad}}}"
        return "[\n" + ",\n".join(f"{inner}{render(v, indent + 4)}" for v in value) + f"\n{pad}]"

    return render(content, 0) + "\n"


def _apply(path: Path, changes: dict[str, Any]) -> None:
    where = str(path)
    if path.suffix == ".json":
        config = json.loads(path.read_text(encoding="utf-8"))
        for key, value in changes.items():
            set_config_key(config, key, value)
        path.write_text(format_config(config), encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    for old, new in changes.items():
        if text.count(old) != 1:
            raise ValueError(f"{where}: {old!r} occurs {text.count(old)} times in the source, expected once")
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")


def write_plan(bundle: str | Path, plan: dict[str, Any]) -> None:
    """Write ``plan`` as the ``plan`` key of the bundle folder's :data:`PLAN_CONFIGS` (each file re-written by
    :func:`format_config`)."""
    for relative in PLAN_CONFIGS:
        _apply(Path(bundle) / relative, {"plan": plan})


def write_variant(bundles: str | Path, name: str) -> Path:
    """Write ``<bundles>/<name>`` from ``<bundles>/ln_ct_dynunet`` and :data:`VARIANTS` ``[name]``.

    Only the files the source bundle tracks are copied (configs, docs, LICENSE, large_files.yml), never its
    generated ``data/``, ``models/`` or ``eval/`` folders.

    Args:
        bundles: the folder holding the source bundle.
        name: a key of :data:`VARIANTS`.

    Returns:
        The variant's folder (replaced whole).

    Raises:
        KeyError: unknown variant, or a change naming a key the source does not have.
    """
    if name not in VARIANTS:
        raise KeyError(f"unknown bundle variant {name!r}; known: {', '.join(VARIANTS)}")
    bundles = Path(bundles)
    source, target = bundles / SOURCE_BUNDLE, bundles / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("data", "models", "eval", "__pycache__"))
    for relative, changes in VARIANTS[name].items():
        _apply(target / relative, changes)
    write_plan(target, bundle_plans()[name])
    return target


def write_variants(bundles: str | Path) -> list[Path]:
    """Write the source bundle's plan, then regenerate every variant bundle under ``bundles``."""
    write_plan(Path(bundles) / SOURCE_BUNDLE, bundle_plans()[SOURCE_BUNDLE])
    return [write_variant(bundles, name) for name in VARIANTS]


if __name__ == "__main__":
    for folder in write_variants(sys.argv[1] if len(sys.argv) > 1 else "bundles"):
        print(f"wrote {folder}")
