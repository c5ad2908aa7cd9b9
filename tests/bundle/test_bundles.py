"""Model-zoo-style tests of both bundles: every workflow through ``monai.bundle.ConfigWorkflow``, resumable
training, the layout and metadata the model zoo requires, and the generated variant bundle."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLE_NAMES, BUNDLES, TINY_NETWORK, TINY_RUN, make_workflow, run_like_model_zoo
from helpers import error_chain
from ignite.engine import Events

from dgst_monai.bundle.variants import SOURCE_BUNDLE, VARIANTS, write_variants

#: Keys the model zoo and MONAI Label read, per config they must be found in.
REQUIRED_KEYS = {
    "train": (
        "bundle_root", "device", "dataset_dir", "network_def", "network", "train#trainer", "train#trainer#max_epochs",
        "train#dataset#data", "train#handlers", "train#inferer", "validate#evaluator", "validate#dataset#data",
        "val_interval", "inferer", "preprocessing", "postprocessing",
    ),
    "inference": (
        "bundle_root", "device", "dataset_dir", "network_def", "network", "dataset", "evaluator", "inferer",
        "preprocessing", "postprocessing", "handlers", "datalist", "output_dir", "checkpoint",
    ),
}  # fmt: skip

#: Mandatory metadata keys of the MONAI Bundle specification (docs/source/mb_specification.rst, "metadata.json
#: File"; ``optional_packages_version`` included), plus ``changelog`` and ``required_packages_version`` that the
#: model-zoo CI reads, and the keys every tensor format specifier must have. Checked offline: ``verify_metadata``
#: downloads the schema.
METADATA_KEYS = (
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
    "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
)  # fmt: skip
TENSOR_KEYS = (
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
)  # fmt: skip
README_SECTIONS = (
    "Overview", "Data", "Training configuration", "Input", "Output", "Performance", "MONAI Bundle Commands",
    "References", "License",
)  # fmt: skip


def _load(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / f"{name}.json").read_text(encoding="utf-8"))


def _has(config: dict, key: str) -> bool:
    node = config
    for part in key.split("#"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_layout_keys_and_metadata(bundle):
    """Model-zoo files exist; the keys the zoo and MONAI Label rely on exist; metadata has the required fields."""
    root = BUNDLES / bundle
    for rel in (
        "LICENSE", "large_files.yml", "docs/README.md", "docs/data_license.txt", "configs/logging.conf",
        *(f"configs/{n}.json" for n in (
            "train", "finetune", "evaluate", "inference", "multi_gpu_train", "multi_gpu_evaluate", "metadata",
            "cpu_small",
        )),
    ):  # fmt: skip
        assert (root / rel).is_file(), f"{bundle}: {rel} missing"
    for name, keys in REQUIRED_KEYS.items():
        config = _load(bundle, name)
        missing = [k for k in keys if not _has(config, k)]
        assert not missing, f"{bundle}/configs/{name}.json lacks {missing}"

    meta = _load(bundle, "metadata")
    assert [k for k in METADATA_KEYS if k not in meta] == []
    assert meta["version"] in meta["changelog"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    for io in ("inputs", "outputs"):
        for name, spec in meta["network_data_format"][io].items():
            assert [k for k in TENSOR_KEYS if k not in spec] == [], f"{io}/{name}"
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (image["modality"], image["format"], image["num_channels"]) == ("CT", "hounsfield", 1)
    assert pred["channel_def"] == {"0": "background", "1": "lymph node"}
    # a divisibility rule (the total stride per axis), valid for the written plan and for every --preset
    assert image["spatial_shape"] == pred["spatial_shape"] and all(re.fullmatch(r"\d+\*n", a) for a in image["spatial_shape"])
    metrics, details = meta["eval_metrics"], meta["eval_metrics_details"].lower()
    if metrics:  # measured: both figures, on the synthetic data the details name
        assert {"mean_dice", "mean_nsd_1mm"} <= set(metrics)
        assert all(isinstance(metrics[k], float) and 0.0 <= metrics[k] <= 1.0 for k in ("mean_dice", "mean_nsd_1mm"))
        assert "synthetic" in details
    else:  # never figures of another bundle: an empty record says it was not measured
        assert "not measured" in details

    # no weights are published: no link to a made-up address
    large = (root / "large_files.yml").read_text(encoding="utf-8")
    assert re.search(r"^large_files: \[\]$", large, flags=re.M) and "://" not in large
    readme = (root / "docs" / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", readme, flags=re.M)
    assert [s for s in README_SECTIONS if s not in headings] == []
    assert "torchrun" in readme and "--nnodes" in readme and "--rdzv-backend c10d" in readme


def test_generated_bundle_is_up_to_date_and_bundles_hold_no_links(tmp_path):
    """ln_ct_swinunetr is exactly what dgst_monai.bundle.variants writes from ln_ct_dynunet, and the network
    written in both bundles (``plan``) is the planner's; no bundle links."""
    shutil.copytree(BUNDLES / SOURCE_BUNDLE, tmp_path / SOURCE_BUNDLE, ignore=shutil.ignore_patterns("data", "models", "eval"))
    write_variants(tmp_path)
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and _tracked(p, root))  # noqa: E731
    for name in (SOURCE_BUNDLE, *VARIANTS):
        generated, committed = tmp_path / name, BUNDLES / name
        assert files(generated) == files(committed), f"{name}: regenerate with python -m dgst_monai.bundle.variants bundles"
        for rel in files(generated):
            assert (generated / rel).read_bytes() == (committed / rel).read_bytes(), f"{name}/{rel} is stale"
    assert [p for p in BUNDLES.rglob("*") if p.is_symlink()] == []


def _tracked(path: Path, root: Path) -> bool:
    # generated run outputs (git-ignored) are not part of a bundle
    return path.relative_to(root).parts[0] not in ("data", "models", "eval")


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_train_finetune_evaluate_infer_like_the_model_zoo(bundle, tiny_ct, tmp_path):
    """Each workflow of the bundle: ConfigWorkflow initialize, check_properties, run, finalize."""
    net = TINY_NETWORK[bundle]
    foundation, tuned = tmp_path / "foundation", tmp_path / "tuned"

    train = run_like_model_zoo(
        bundle, ["train"], "train", datalist=tiny_ct.hn, ckpt_dir=str(foundation), **net, **TINY_RUN
    )
    assert train.parser.get_parsed_content("train#trainer").state.epoch == 1
    for name in ("model.pt", "training_state_epoch=1.pt", "normalization.json"):
        assert (foundation / name).is_file(), name
    state = torch.load(foundation / "training_state_epoch=1.pt", map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "random", "trainer", "checkpointer"}

    run_like_model_zoo(
        bundle,
        ["train", "finetune"],
        "train",
        datalist=tiny_ct.mediastinum,
        foundation_checkpoint=str(foundation / "model.pt"),
        ckpt_dir=str(tuned),
        method="dgst",
        shots=1,
        **net,
        **TINY_RUN,
    )
    before = torch.load(foundation / "model.pt", map_location="cpu", weights_only=True)
    after = torch.load(tuned / "model.pt", map_location="cpu", weights_only=True)
    kernels = [k for k, v in before.items() if v.ndim == 5 and v.shape[-1] == 3 and "out" not in k and "head" not in k]
    changed = [int((after[k] != before[k]).view(before[k].shape[0], -1).sum(1).max()) for k in kernels]
    assert max(changed) == 1, "strict DGST, gamma 1, one step: at most one entry per output filter moves"

    evaluation = run_like_model_zoo(
        bundle, ["train", "evaluate"], "eval", datalist=tiny_ct.mediastinum, ckpt_dir=str(tuned), **net, **TINY_RUN
    )
    with open(tuned / "eval" / "per_case_metrics.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["case_id"] for r in rows] == ["mediastinum_0002"]
    summary = json.loads((tuned / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_cases"] == 1 and 0.0 <= summary["nsd_1mm"]["mean"] <= 1.0
    # evaluated in the original image space: the label the metrics saw has the original grid
    label = evaluation.parser.get_parsed_content("evaluator").state.output[0]["label"]
    original = sitk.ReadImage(str(Path(tiny_ct.mediastinum).parent / "labelsTs" / "mediastinum_0002.nii.gz"))
    assert tuple(label.shape[1:]) == original.GetSize()

    image = Path(tiny_ct.mediastinum).parent / "imagesTs" / "mediastinum_0002.nii.gz"
    run_like_model_zoo(
        bundle,
        ["inference"],
        "infer",
        datalist=[str(image)],
        output_dir=str(tmp_path / "masks"),
        checkpoint=str(tuned / "model.pt"),
        **net,
    )
    mask = sitk.ReadImage(str(tmp_path / "masks" / "mediastinum_0002_lymph_nodes.nii.gz"))
    source = sitk.ReadImage(str(image))
    assert mask.GetSize() == source.GetSize()
    assert mask.GetPixelID() == sitk.sitkUInt8


def test_training_resumes_from_the_latest_full_state(tiny_ct, tmp_path):
    """--resume true continues an interrupted run from its atomically saved state (model, optimizer, lr
    scheduler, trainer)."""
    bundle, net = "ln_ct_dynunet", TINY_NETWORK["ln_ct_dynunet"]
    run = dict(TINY_RUN, max_epochs=2, val_interval=0, datalist=tiny_ct.hn, ckpt_dir=str(tmp_path))

    interrupted = make_workflow(bundle, ["train"], "train", **net, **run)
    interrupted.initialize()
    trainer = interrupted.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())  # "killed"
    interrupted.run()
    saved = torch.load(tmp_path / "training_state_epoch=1.pt", map_location="cpu", weights_only=True)
    assert set(saved) == {"model", "optimizer", "lr_scheduler", "random", "trainer", "checkpointer"}
    assert saved["optimizer"]["state"]

    resumed = make_workflow(bundle, ["train"], "train", resume=True, **net, **run)
    resumed.initialize()
    trainer = resumed.parser.get_parsed_content("train#trainer")
    network = resumed.parser.get_parsed_content("network")
    optimizer = resumed.parser.get_parsed_content("optimizer")
    seen = {}

    def at_epoch_start(engine):
        seen["epoch"], seen["lr"] = engine.state.epoch, optimizer.param_groups[0]["lr"]
        seen["weights_restored"] = all(torch.equal(v, saved["model"][k]) for k, v in network.state_dict().items())

    trainer.add_event_handler(Events.EPOCH_STARTED, at_epoch_start)
    resumed.run()
    resumed.finalize()
    assert seen == {"epoch": 2, "lr": pytest.approx(0.01 * 0.5**0.9), "weights_restored": True}
    assert (trainer.state.epoch, trainer.state.iteration) == (2, 2)  # epoch 1 was not trained again
    assert sorted(p.name for p in tmp_path.glob("training_state_*")) == ["training_state_epoch=2.pt"]

    empty = make_workflow(bundle, ["train"], "train", resume=True, **net, **dict(run, ckpt_dir=str(tmp_path / "x")))
    empty.initialize()
    with pytest.raises(Exception) as failure:
        empty.run()
    assert any(isinstance(e, FileNotFoundError) and "no training state" in str(e) for e in error_chain(failure.value))
