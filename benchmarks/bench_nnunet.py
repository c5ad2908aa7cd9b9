"""Side by side with nnU-Net v2: training iterations with data loading, sliding-window inference, peak RSS.

One invocation prepares everything and then alternates the two sides round by round; every measurement runs in
a fresh subprocess (its own peak RSS, no warm caches carried from the other side), single-threaded
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``, ``nnUNet_def_n_proc=1``, data loading in the training
process: MONAI ``num_workers=0``, ``nnUNet_n_proc_DA=0``) unless ``--threads`` / ``--workers`` say otherwise.

Preparation (not timed):

* synthetic CT phantoms (``dgst_monai.data``, RAS arrays so that ``Orientationd("RAS")`` is a no-op and both
  tools see the same voxels) written as our datalist and as an nnU-Net raw dataset (``imagesTr``/``labelsTr``,
  ``dataset.json``);
* nnU-Net's own fingerprinting and planning, then the ``3d_fullres`` configuration overwritten with our plan
  (``dgst_monai.networks`` preset, patch, batch 2, spacing, kernels, strides, filters; nnU-Net's axis order is
  ours reversed), then nnU-Net's own preprocessing;
* an nnU-Net model folder (``nnUNetTrainer`` initialised on that plan, ``fold_all/checkpoint_final.pth``) and
  the same weights as our bundle checkpoint (``dgst_monai.networks.export_nnunet``: model, plan override,
  normalisation).

Measured (medians over rounds, ratio ours / nnU-Net):

1. Training iteration, data loading included: our bundle's pre-training trainer (``train.json``) and DGST
   fine-tuning trainer (``train.json`` + ``finetune.json``: DGSTHandler, strict, gamma 1), built by MONAI's
   ``ConfigParser`` from the bundle configs with overrides for datalist, plan, epochs and handlers, against
   ``nnUNetTrainer.train_step`` on batches from its own data loader and augmentation. Time waiting for data
   (ours: ignite's ``GET_BATCH_STARTED`` to ``GET_BATCH_COMPLETED``; nnU-Net: ``next(dataloader_train)``) and
   compute are reported separately.
2. Inference file to file: our bundle's ``inference.json`` evaluator (load, RAS, normalise and resample as nnU-Net does,
sliding
   window with Gaussian weighting, overlap 0.5, no mirroring, invert, argmax, save) against
   ``nnUNetPredictor.predict_from_files_sequential`` (tile step 0.5, Gaussian, no mirroring), on the same
   weights, and the Dice between the two masks.
3. Peak RSS of each measurement: the growth of ``VmHWM`` over the RSS just before the timed part, and the
   absolute peak.

Usage (needs nnunetv2, e.g. ``pip install -e ".[nnunet]"``)::

    python benchmarks/bench_nnunet.py --work /tmp/bench_nnunet --json /tmp/bench_nnunet.json --markdown /tmp/b.md
    python benchmarks/bench_nnunet.py --size tiny --work /tmp/bn_tiny   # smoke run, about a minute
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dgst's helpers, whatever the working directory
from bench_dgst import log, median, write_results  # noqa: E402

from dgst_monai.memory import peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "bundles" / "ln_ct_dynunet"
DATASET_ID = 501
DATASET_NAME = f"Dataset{DATASET_ID:03d}_DGSTBench"
CONFIGURATION = "3d_fullres"
FOLD = "all"  # nnU-Net's 5-fold split needs >= 5 cases; "all" trains on every case
LABELS = {"background": 0, "lymph_node": 1}
SIZES: dict[str, dict[str, Any]] = {
    # the paper's plan (filters 32-64-128-256-320-320, anisotropic first kernel) at bench_dgst's 96x96x64 patch:
    # its 80x112x224 patch would take over a minute per iteration on one thread
    "paper": {
        "plan": "paper", "plan_overrides": {}, "patch": [96, 96, 64], "cases": 5, "iterations": 1, "warmup": 1,
        "rounds": 3,
        "volumes": {
            # a CT-sized synthetic volume, at the plan's spacing: x and y (256) are not 96 + k * 48, so MONAI and
            # nnU-Net place the windows differently there
            "ct160x256x256": {"fov_mm": (204.8, 204.8, 400.0), "spacing_mm": (0.8, 0.8, 2.5)},
            # every axis patch + k * patch / 2: both tools place exactly the same windows
            "ct160x240x240-aligned": {"fov_mm": (192.0, 192.0, 400.0), "spacing_mm": (0.8, 0.8, 2.5)},
            # real-CT-like thick slices, resampled by both to 144 x 144 x 128 at the plan's spacing (aligned)
            "aniso0.57x0.57x5": {"fov_mm": (115.2, 115.2, 320.0), "spacing_mm": (0.57, 0.57, 5.0)},
        },
        "train_fov_mm": (170.0, 170.0, 200.0),
    },
    # smoke run: the cpu-small plan at filters 8-16-32-64, planned for the phantoms' own spacing so that neither
    # side resamples and the masks compare the two pipelines alone
    "tiny": {
        "plan": "cpu-small", "plan_overrides": {"base_filters": 8, "spacing": (0.8, 0.8, 2.0)},
        "patch": [48, 48, 32], "cases": 3, "iterations": 1, "warmup": 1, "rounds": 1,
        "volumes": {"small": {"fov_mm": (76.8, 76.8, 96.0), "spacing_mm": (0.8, 0.8, 2.0)},
                    # thick slices: both tools resample (to 72 x 72 x 38 voxels at the plan's spacing)
                    "thick5mm": {"fov_mm": (57.6, 57.6, 76.0), "spacing_mm": (0.57, 0.57, 5.0)}},
        "train_fov_mm": (80.0, 80.0, 80.0),
    },
}
TRAIN_SIDES = ("ours-pretrain", "ours-dgst", "nnunet")
INFER_SIDES = ("ours", "nnunet")
#: our-side variants, timed as extra sides: "monai-gaussian" (inference) weights the windows with MONAI's own
#: Gaussian, centred at (patch - 1) / 2, instead of the bundles' nnU-Net-style one centred on voxel patch // 2;
#: "channels-last" runs the network in torch.channels_last_3d memory format (training: the pre-training side);
#: "bf16" sets the bundles' ``precision`` to bfloat16 (the network's forward pass autocast, weights, loss and
#: gradients float32; nnU-Net autocasts only on CUDA, so its CPU side stays float32); "monai-resampling" sets
#: ``resampling`` back to the bundles' own rule (trilinear, then normalisation) from the imported model's "nnunet";
#: "compile" sets the bundles' ``compile`` (torch.compile, inductor, weights frozen) and "bf16-compile" both. A
#: compiled side's inductor cache lives in the work folder and is emptied before the first round: round 1 includes
#: a cold compile, later rounds load the compiled code from that cache (a warm start, as a second run would)
#: "monai-window" runs MONAI's SlidingWindowInferer (its window places and stitching, the bundles' Gaussian) instead
#: of the bundles' own window loop; "inference-mode" runs the evaluator under torch.inference_mode, not no_grad
OUR_VARIANTS = ("monai-gaussian", "channels-last", "bf16", "monai-resampling", "compile", "bf16-compile",
                "monai-window", "inference-mode")
#: training variant -> the our-side training sides it is timed for
TRAIN_VARIANTS = {"channels-last": ("ours-pretrain",), "bf16": ("ours-pretrain", "ours-dgst")}


# --------------------------------------------------------------------------------------------------------------
# Environment: must be set before nnunetv2 or torch is imported in a worker
# --------------------------------------------------------------------------------------------------------------


def worker_env(work: Path, threads: int, workers: int) -> dict[str, str]:
    """Environment of every measurement subprocess: nnU-Net's folders, thread and worker counts."""
    n = str(threads)
    return {
        **os.environ,
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        # nnU-Net sets torch's threads to this in export and planning; its default is 8
        "nnUNet_def_n_proc": n,
        "nnUNet_n_proc_DA": str(workers),  # 0: its SingleThreadedAugmenter, in the training process
        "nnUNet_compile": "f",
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def our_plan(size: dict[str, Any]):  # -> DynUNetPlan
    """Our plan (``dgst_monai.networks.plan_preset``) with the run size's patch."""
    from dgst_monai.networks import plan_preset

    plan = plan_preset(size["plan"], **size["plan_overrides"])
    return replace(plan, patch_size=tuple(size["patch"]))


# --------------------------------------------------------------------------------------------------------------
# Preparation (in the main process, with the nnU-Net environment set)
# --------------------------------------------------------------------------------------------------------------


def write_volume(path: Path, domain: str, seed: int, **knobs: Any) -> Path:
    """One phantom CT (RAS arrays) as NIfTI, unless it is there already."""
    from dgst_monai.data.phantoms import synthesize_case, write_nifti

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        case = synthesize_case(domain, seed, orientation="RAS", **knobs)
        write_nifti(path, case.image, case.affine)
    return path


def prepare(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    """Datasets, nnU-Net plans and preprocessing, the nnU-Net model folder and our checkpoint of its weights."""
    from dgst_monai.data.datalists import load_split, synthetic_datalist
    from dgst_monai.networks import export_nnunet

    plan = our_plan(size)
    datalist = synthetic_datalist(work / "synthetic_hn", domain="hn", n=size["cases"], orientation="RAS",
                                  fov_mm=size["train_fov_mm"])
    cases = load_split(datalist, "training")
    raw = work / "nnUNet_raw" / DATASET_NAME
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for case in cases:  # nnU-Net's names: <case>_0000 for channel 0 of the image
        for src, dst in ((case["image"], raw / "imagesTr" / f"{case['case_id']}_0000.nii.gz"),
                         (case["label"], raw / "labelsTr" / f"{case['case_id']}.nii.gz")):
            if not dst.exists():
                dst.symlink_to(src)
    dataset = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(cases), "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")

    model_folder = work / "nnUNet_results" / DATASET_NAME / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
    ckpt = model_folder / f"fold_{FOLD}" / "checkpoint_final.pth"
    if not ckpt.is_file():
        plans = nnunet_plans(work, plan)
        nnunet_model_folder(plans, dataset, model_folder)
    ours = work / "ours_model"
    export_nnunet(model_folder, ours / "model.pt", fold=FOLD)
    volumes = {name: str(write_volume(work / "volumes" / f"{name}_0000.nii.gz", "hn", 1000 + i, **knobs))
               for i, (name, knobs) in enumerate(size["volumes"].items())}
    return {"datalist": datalist, "model_folder": str(model_folder), "ours_checkpoint": str(ours / "model.pt"),
            "ours_override": str(ours / "model_override.json"), "volumes": volumes, "cases": len(cases)}


def write_scan(source: Path, path: Path) -> Path:
    """A real scan (volume file or DICOM series folder) as the NIfTI both sides read, unless it is there already."""
    from dgst_monai.data.readers import SimpleITKReader

    if not path.is_file():
        import SimpleITK as sitk

        if source.is_dir():  # a DICOM series: the one folder's files in slice order
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(source))
            if not names:
                raise FileNotFoundError(f"--scan {source}: no DICOM series in this folder")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(source))
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path))
    SimpleITKReader().read(str(path))  # fails here, naming the file, if our side could not read it
    return path


def nnunet_plans(work: Path, plan) -> dict[str, Any]:
    """nnU-Net's fingerprint and plans, ``3d_fullres`` overwritten with our plan, then its preprocessing."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    path = work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"
    plans = json.loads(path.read_text(encoding="utf-8"))
    config = plans["configurations"][CONFIGURATION]
    rev = lambda v: list(v)[::-1]  # noqa: E731  (ours are (x, y, z), nnU-Net's (z, y, x) of the SimpleITK array)
    n = plan.n_stages
    config.update(
        patch_size=rev(plan.patch_size), spacing=rev(plan.spacing), batch_size=plan.batch_size,
        batch_dice=True,  # the bundle's DiceCE has batch=True
    )
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=n, features_per_stage=list(plan.filters), kernel_sizes=[rev(k) for k in plan.kernel_size],
        strides=[rev(s) for s in plan.strides], n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1),
        conv_bias=True,
    )
    # our axes are the array's reversed: keep nnU-Net's array order as it is
    plans.update(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    plans["configurations"] = {CONFIGURATION: config}
    path.write_text(json.dumps(plans, indent=1), encoding="utf-8")
    preprocess([DATASET_ID], configurations=[CONFIGURATION], num_processes=[1], show_progress_bar=False)
    return plans


def nnunet_model_folder(plans: dict[str, Any], dataset: dict[str, Any], model_folder: Path) -> None:
    """An nnU-Net model folder of an initialised nnUNetTrainer (its own He initialisation), as training writes it."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    # nnU-Net's run_training adds (and the trainer pops) "continue_training"
    trainer = nnUNetTrainer({**plans, "continue_training": False}, CONFIGURATION, FOLD, dataset,
                            device=torch.device("cpu"))
    trainer.initialize()
    torch.manual_seed(0)
    with torch.no_grad():  # He init with zero biases gives near-uniform logits; make the masks depend on the weights
        for name, p in trainer.network.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    (model_folder / f"fold_{FOLD}").mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(model_folder / f"fold_{FOLD}" / "checkpoint_final.pth"))
    (model_folder / "plans.json").write_text(json.dumps(plans, indent=1), encoding="utf-8")
    (model_folder / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# Workers (one measurement each, in a fresh process)
# --------------------------------------------------------------------------------------------------------------


def _peak(out: dict[str, Any], rss_before: float) -> None:
    out["peak_rss_mib"] = peak_rss_mb()
    out["peak_growth_mib"] = out["peak_rss_mib"] - rss_before


def _start_peak() -> float:
    reset_peak_rss()
    return rss_mb()


def train_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Our bundle's trainer (pre-training, or DGST fine-tuning), built from the bundle configs; per-iteration times."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    dgst = spec["side"].startswith("ours-dgst")
    configs = ["train"] + (["finetune"] if dgst else [])
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / f"{c}.json") for c in configs])
    n_iter = spec["warmup"] + spec["iterations"]
    plan = our_plan(spec["size"])
    overrides = {
        "bundle_root": spec["work"] + "/ours_bundle",
        "datalist": spec["datalist"],
        "plan": plan.to_config(),
        "device": "$torch.device('cpu')",
        "amp": False,
        "num_workers": spec["workers"],
        "iterations_per_epoch": n_iter,
        "max_epochs": 1,
        "val_interval": 0,
        "num_validation": 0,
        "train#handlers": [],  # checkpoints and logging are not what is timed
    }
    if dgst:
        overrides.update(shots=spec["cases"], normalization="shots")
    if spec["side"].endswith("-bf16"):
        overrides["precision"] = "bfloat16"
    for key, value in overrides.items():
        parser[key] = value
    t0 = time.perf_counter()
    trainer = parser.get_parsed_content("train#trainer")  # builds the CacheDataset (caches every case)
    if spec["side"].endswith("-channels-last"):  # in place: the optimizer keeps the same parameters
        trainer.network.to(memory_format=torch.channels_last_3d)
    setup_s = time.perf_counter() - t0
    stamps: dict[str, float] = {}
    iters: list[dict[str, float]] = []

    def stamp(engine, key: str) -> None:
        stamps[key] = time.perf_counter()
        if key == "end":
            iters.append({"data": stamps["batch_done"] - stamps["batch"], "compute": stamps["end"] - stamps["start"],
                          "total": stamps["end"] - stamps["batch"]})

    for event, key in ((Events.GET_BATCH_STARTED, "batch"), (Events.GET_BATCH_COMPLETED, "batch_done"),
                       (Events.ITERATION_STARTED, "start"), (Events.ITERATION_COMPLETED, "end")):
        trainer.add_event_handler(event, stamp, key)
    out: dict[str, Any] = {"setup_s": setup_s, "threads": torch.get_num_threads()}

    def timed_part(engine) -> None:  # after the warm-up iterations
        if engine.state.iteration == spec["warmup"]:
            out["rss_before_mib"] = _start_peak()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, timed_part)
    trainer.run()
    _peak(out, out.pop("rss_before_mib"))
    out["iterations"] = iters[spec["warmup"]:]
    out["dgst_handler"] = dgst and any(type(h).__name__ == "FineTuningHandler"
                                       for h in parser.get_parsed_content("train#trainer#train_handlers"))
    return out


def train_nnunet(spec: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net v2's trainer on the same plan: ``next(dataloader_train)`` then ``train_step``, per iteration."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    folder = Path(spec["model_folder"])
    plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
    dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    trainer = nnUNetTrainer({**plans, "continue_training": False}, CONFIGURATION, FOLD, dataset,
                            device=torch.device("cpu"))
    scratch = Path(spec["work"]) / "nnunet_train_scratch"  # its logs and copies, not the model folder
    scratch.mkdir(parents=True, exist_ok=True)
    trainer.output_folder_base = trainer.output_folder = str(scratch)
    trainer.log_file = str(scratch / "training_log.txt")
    trainer.on_train_start()  # initialise, data loaders (its augmentation), unpack the preprocessed data
    trainer.on_train_epoch_start()
    torch.set_num_threads(spec["threads"])
    setup_s = time.perf_counter() - t0
    iters = []
    out: dict[str, Any] = {"setup_s": setup_s, "threads": torch.get_num_threads()}
    rss_before = 0
    for i in range(spec["warmup"] + spec["iterations"]):
        if i == spec["warmup"]:
            rss_before = _start_peak()
        t0 = time.perf_counter()
        batch = next(trainer.dataloader_train)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        iters.append({"data": t1 - t0, "compute": t2 - t1, "total": t2 - t0})
    _peak(out, rss_before)
    out["iterations"] = iters[spec["warmup"]:]
    out["patch_size"] = list(trainer.configuration_manager.patch_size)
    out["batch_size"] = trainer.batch_size
    out["deep_supervision_outputs"] = len(trainer._get_deep_supervision_scales())
    return out


def infer_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """Our bundle's inference (``inference.json`` + the exported plan override) of one volume, file to file."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), spec["ours_override"]])
    for key, value in {"checkpoint": spec["ours_checkpoint"], "datalist": [spec["volume"]],
                       "output_dir": spec["output_dir"], "mirror": False, "amp": False,
                       "device": "$torch.device('cpu')"}.items():
        parser[key] = value
    if spec.get("variant") in ("bf16", "bf16-compile"):
        parser["precision"] = "bfloat16"
    if spec.get("variant") in ("compile", "bf16-compile"):
        import torch._inductor.config as inductor_config

        parser["compile"] = True
        inductor_config.compile_threads = spec["threads"]  # compile in as many threads as the side runs
    if spec.get("variant") == "monai-resampling":
        parser["resampling"] = "monai"
    evaluator = parser.get_parsed_content("evaluator")
    if spec.get("variant") == "monai-gaussian":
        from monai.data.utils import compute_importance_map

        window = evaluator.inferer.inferer.inferer  # AutocastInferer > MirroringInferer > the sliding window
        window.roi_weight_map = compute_importance_map(window.roi_size, mode="gaussian", sigma_scale=0.125)
    if spec.get("variant") == "monai-window":
        from monai.inferers import SlidingWindowInferer

        ours = evaluator.inferer.inferer.inferer
        window = SlidingWindowInferer(ours.roi_size, ours.sw_batch_size, ours.overlap, mode="gaussian")
        window.roi_weight_map = ours.roi_weight_map
        evaluator.inferer.inferer.inferer = window
    if spec.get("variant") == "channels-last":
        evaluator.network.to(memory_format=torch.channels_last_3d)
    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    rss_before = _start_peak()
    t0 = time.perf_counter()
    with torch.inference_mode(spec.get("variant") == "inference-mode"):
        evaluator.run()
    out["seconds"] = time.perf_counter() - t0
    _peak(out, rss_before)
    out["mask"] = str(next(Path(spec["output_dir"]).glob("*.nii.gz")))
    return out


def infer_nnunet(spec: dict[str, Any]) -> dict[str, Any]:
    """nnUNetPredictor of the same weights: preprocessing, sliding window, export, in this process."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(spec["model_folder"], use_folds=(FOLD,))
    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    name = Path(spec["volume"]).name.replace("_0000.nii.gz", "")
    rss_before = _start_peak()
    t0 = time.perf_counter()
    predictor.predict_from_files_sequential([[spec["volume"]]], [str(Path(spec["output_dir"]) / name)])
    out["seconds"] = time.perf_counter() - t0
    _peak(out, rss_before)
    out["mask"] = str(Path(spec["output_dir"]) / f"{name}.nii.gz")
    return out


WORKERS = {"train-ours-pretrain": train_ours, "train-ours-dgst": train_ours, "train-nnunet": train_nnunet,
           "infer-ours": infer_ours, "infer-nnunet": infer_nnunet,
           **{f"infer-ours-{v}": infer_ours for v in OUR_VARIANTS},
           **{f"train-{side}-{v}": train_ours for v, sides in TRAIN_VARIANTS.items() for side in sides}}


def run_worker(kind: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """One measurement in a fresh process; its JSON result (the last line of its stdout)."""
    spec_path = Path(spec["work"]) / f"spec_{kind}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--spec", str(spec_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def dice(mask_a: str, mask_b: str) -> dict[str, Any]:
    """Dice of the foreground of two masks of the same grid, read with SimpleITK (same axis order for both)."""
    import SimpleITK as sitk

    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(m)) > 0 for m in (mask_a, mask_b))
    if a.shape != b.shape:
        raise ValueError(f"masks {mask_a} {a.shape} and {mask_b} {b.shape} are not on the same grid")
    total = int(a.sum() + b.sum())
    return {"dice": 2 * int((a & b).sum()) / total if total else 1.0, "ours_voxels": int(a.sum()),
            "nnunet_voxels": int(b.sum()), "shape": list(a.shape), "disagree": int((a ^ b).sum())}


# --------------------------------------------------------------------------------------------------------------
# Main: prepare, alternate, summarise
# --------------------------------------------------------------------------------------------------------------


def bench_train(args: argparse.Namespace, base: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    sides = [*TRAIN_SIDES, *(f"{side}-{v}" for v in args.train_variants for side in TRAIN_VARIANTS[v])]
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides:
            res = run_worker(f"train-{side}", {**base, "side": side}, env)
            raw[side].append(res)
            log(f"[train round {r + 1}/{args.rounds}] {side:<14} " + ", ".join(
                f"{it['total']:.2f} s (data {it['data']:.2f})" for it in res["iterations"])
                + f"; peak RSS {res['peak_rss_mib']:.0f} MiB")
    summary = {}
    for side, runs in raw.items():
        its = [it for run in runs for it in run["iterations"]]
        summary[side] = {k: median([it[k] for it in its]) for k in ("total", "data", "compute")}
        summary[side]["peak_rss_mib"] = median([run["peak_rss_mib"] for run in runs])
        summary[side]["peak_growth_mib"] = median([run["peak_growth_mib"] for run in runs])
        summary[side]["n"] = len(its)
    for side in (s for s in sides if s != "nnunet"):
        summary[side]["ratio_to_nnunet"] = summary[side]["total"] / summary["nnunet"]["total"]
        # per round: this side's median over the nnU-Net median of the same round (drift cancels)
        summary[side]["paired_ratio"] = median([
            median([it["total"] for it in a["iterations"]]) / median([it["total"] for it in b["iterations"]])
            for a, b in zip(raw[side], raw["nnunet"])])
    return {"raw": raw, "summary": summary}


def bench_infer(args: argparse.Namespace, base: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    sides = [*INFER_SIDES, *(f"ours-{v}" for v in args.variants)]
    out: dict[str, Any] = {}
    for name, volume in base["volumes"].items():
        raw: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for r in range(args.infer_rounds):
            for side in sides:
                folder = Path(base["work"]) / "predictions" / f"{name}_{side}_r{r}"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                variant = side[len("ours-"):] if side.startswith("ours-") else None
                spec = {**base, "volume": volume, "output_dir": str(folder), "variant": variant}
                side_env = env
                if variant in ("compile", "bf16-compile"):
                    cache = Path(base["work"]) / "inductor_cache" / f"{name}_{variant}"
                    if r == 0:
                        shutil.rmtree(cache, ignore_errors=True)
                    side_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
                res = run_worker(f"infer-{side}", spec, side_env)
                raw[side].append(res)
                log(f"[infer {name} round {r + 1}/{args.infer_rounds}] {side:<7} {res['seconds']:.1f} s, "
                    f"peak RSS {res['peak_rss_mib']:.0f} MiB")
        summary: dict[str, Any] = {"sides": {}}
        for side in sides:
            x = summary["sides"][side] = {k: median([run[k] for run in raw[side]])
                                          for k in ("seconds", "peak_rss_mib", "peak_growth_mib")}
        for side, x in summary["sides"].items():
            x["ratio"] = x["seconds"] / summary["sides"]["nnunet"]["seconds"]
            x["paired_ratio"] = median([a["seconds"] / b["seconds"] for a, b in zip(raw[side], raw["nnunet"])])
            if side != "nnunet":  # agreement of this side's mask with nnU-Net's
                x["agreement"] = dice(raw[side][-1]["mask"], raw["nnunet"][-1]["mask"])
        import SimpleITK as sitk

        img = sitk.ReadImage(volume)
        summary["volume"] = {"size_xyz": list(img.GetSize()), "spacing_xyz": [round(v, 3) for v in img.GetSpacing()]}
        log(f"[infer {name}] " + ", ".join(f"{s}: x{summary['sides'][s]['ratio']:.3f} Dice "
                                           f"{summary['sides'][s]['agreement']['dice']:.4f}" for s in sides
                                           if s != "nnunet"))
        out[name] = {"raw": raw, "summary": summary}
    return out


def report(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"Command: `{cfg['command']}`",
        "",
        f"Machine: {cfg['machine']}, {cfg['cpus']} CPUs, {cfg['threads']} thread(s) per measurement, data-loading "
        f"workers {cfg['workers']}; torch {cfg['torch']}, MONAI {cfg['monai']}, nnunetv2 {cfg['nnunetv2']}; load "
        f"average at start {cfg['loadavg_start']}.",
        f"Plan: {cfg['plan']} (filters {cfg['filters']}), patch {cfg['patch']} (x, y, z), batch {cfg['batch']}, "
        f"{cfg['parameters'] / 1e6:.2f} M parameters.",
    ]
    if "train" in result:
        s = result["train"]["summary"]
        lines += ["", "| side | median iteration (s) | waiting for data (s) | compute (s) | ratio to nnU-Net "
                  "| paired ratio | peak RSS (MiB) | peak RSS growth (MiB) | iterations |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for side, x in s.items():
            lines.append(f"| {side} | {x['total']:.2f} | {x['data']:.2f} | {x['compute']:.2f} | "
                         f"{x.get('ratio_to_nnunet', 1.0):.3f} | {x.get('paired_ratio', 1.0):.3f} | "
                         f"{x['peak_rss_mib']:.0f} | {x['peak_growth_mib']:.0f} | {x['n']} |")
    for name, inf in result.get("inference", {}).items():
        s = inf["summary"]
        lines += ["", f"Inference `{name}`: volume {s['volume']['size_xyz']} voxels (x, y, z) at "
                  f"{s['volume']['spacing_xyz']} mm.", "",
                  "| side | median wall time (s) | ratio to nnU-Net | paired ratio | Dice with nnU-Net's mask "
                  "| voxels that differ | peak RSS (MiB) | peak RSS growth (MiB) |", "|---|---|---|---|---|---|---|---|"]
        for side, x in s["sides"].items():
            agree = x.get("agreement")
            dice_text = f"{agree['dice']:.4f} | {agree['disagree']}" if agree else "- | -"
            lines.append(f"| {side} | {x['seconds']:.1f} | {x['ratio']:.3f} | {x['paired_ratio']:.3f} | {dice_text} | "
                         f"{x['peak_rss_mib']:.0f} | {x['peak_growth_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="paper")
    p.add_argument("--work", default="/tmp/bench_nnunet", help="folder for data, nnU-Net folders, predictions")
    p.add_argument("--rounds", type=int, help="training rounds (each side once per round, alternating)")
    p.add_argument("--iterations", type=int, help="timed training iterations per side and round")
    p.add_argument("--warmup", type=int, help="untimed training iterations per side and round")
    p.add_argument("--infer-rounds", type=int, default=1, help="inference rounds per volume")
    p.add_argument("--volumes", nargs="*", help="inference volumes of the run size to run (default: all, or none "
                   "with --scan)")
    p.add_argument("--scan", nargs="*", default=[], help="real scans to run inference on as well: NIfTI / NRRD "
                   "files or DICOM series folders (written once as NIfTI, which both sides then read)")
    p.add_argument("--variants", nargs="*", default=["monai-gaussian"], choices=OUR_VARIANTS,
                   help="our-side inference variants timed as extra sides")
    p.add_argument("--train-variants", nargs="*", default=[], choices=sorted(TRAIN_VARIANTS),
                   help="variants of our training sides timed as extra sides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes, both sides")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "inference"])
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    size = SIZES[args.size]
    for key in ("rounds", "iterations", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, size[key])
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        import torch

        spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        torch.set_num_threads(spec["threads"])
        print(json.dumps(WORKERS[args.worker](spec)))
        return None
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = worker_env(work, args.threads, args.workers)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("nnUNet", "OMP", "MKL"))})
    # nnU-Net's planner sets torch's threads to nnUNet_n_proc_DA, which must then be positive
    os.environ["nnUNet_n_proc_DA"] = str(max(1, args.workers))
    from importlib.metadata import version

    import monai
    import nnunetv2  # noqa: F401  (fails early and clearly without it)
    import torch

    torch.set_num_threads(args.threads)
    size = copy.deepcopy(SIZES[args.size])
    if args.volumes or args.scan:
        size["volumes"] = {k: v for k, v in size["volumes"].items() if k in (args.volumes or [])}
    plan = our_plan(size)
    result: dict[str, Any] = {"config": {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads, "workers": args.workers,
        "torch": torch.__version__, "monai": monai.__version__, "nnunetv2": version("nnunetv2"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "size": args.size, "plan": size["plan"],
        "filters": list(plan.filters), "patch": list(plan.patch_size), "batch": plan.batch_size,
        "parameters": sum(p.numel() for p in plan.network(1, 2, deep_supervision=True).parameters()),
        "rounds": args.rounds, "iterations": args.iterations, "warmup": args.warmup,
        "infer_rounds": args.infer_rounds,
    }}
    t0 = time.perf_counter()
    prepared = prepare(work, size)
    result["prepare_s"] = time.perf_counter() - t0
    for scan in args.scan:
        name = "scan-" + Path(scan.rstrip("/")).name.split(".")[0]
        prepared["volumes"][name] = str(write_scan(Path(scan), work / "volumes" / f"{name}_0000.nii.gz"))
    log(f"[prepare] {result['prepare_s']:.0f} s: {prepared}")
    base = {**prepared, "work": str(work), "size": size, "threads": args.threads, "workers": args.workers,
            "iterations": args.iterations, "warmup": args.warmup}
    base["size"] = {**size, "volumes": {}}  # JSON-able; the volumes are files by now
    if "train" not in args.skip:
        result["train"] = bench_train(args, base, env)
    if "inference" not in args.skip:
        result["inference"] = bench_infer(args, base, env)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = time.perf_counter() - t0
    write_results(result, report(result), args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
