"""Export to the model zoo (``dgst-monai export``), the documented ``ckpt_export`` command, and the shipped
metadata's shapes as the model zoo's CI checks them.

The export tests fine-tune a tiny network through the bundle (its own configs, which write the training record
and the normalisation beside the checkpoint), evaluate it, export it, unzip the bundle alone into an empty folder
and check it there with MONAI's own tools; then the masks of ``models/model.ts`` and ``models/model.pt`` must be
those of the source checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from bundle_support import BUNDLES, TINY_NETWORK, TINY_RUN
from helpers import bundle_workflow, checked, run_checked
from monai.bundle import ConfigParser, ckpt_export

from dgst_monai.bundle.export import BundleCheckError, export_bundle, verify_bundle, verify_network
from dgst_monai.bundle.record import save_training_record
from dgst_monai.data.datalists import ct_normalization
from dgst_monai.networks import plan_preset, swinunetr_plan
from dgst_monai.normalization import save_normalization
from dgst_monai.predict import predict

#: Patch of the tiny networks (the sliding window's ROI).
PATCH = {"ln_ct_dynunet": plan_preset("tiny").patch_size, "ln_ct_swinunetr": swinunetr_plan("tiny").patch_size}
SITE = "ln_ct_dynunet_site"
SHOTS = 2


def _network(root: Path, config: str, preset: str = "tiny") -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / f"{config}.json"))
    parser["preset"] = preset
    return parser.get_parsed_content("network_def")


def _foundation(root: Path, folder: Path, datalist: str, preset: str = "tiny") -> Path:
    """A foundation checkpoint as training writes it: the training network's state and normalization.json."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    torch.save(_network(root, "train", preset).state_dict(), folder / "model.pt")
    save_normalization(folder, ct_normalization(datalist))
    return folder / "model.pt"


@pytest.fixture(scope="module")
def exported(tiny_ct, tmp_path_factory) -> SimpleNamespace:
    """Fine-tune (strict DGST, 2 shots) and evaluate through a copy of the bundle, export, unzip alone."""
    base = tmp_path_factory.mktemp("export")
    source = base / "source" / "ln_ct_dynunet"
    shutil.copytree(BUNDLES / "ln_ct_dynunet", source, ignore=shutil.ignore_patterns("data", "models", "eval"))
    foundation = _foundation(source, base / "foundation", tiny_ct.hn)
    tuned = base / "tuned"
    run = {**TINY_NETWORK["ln_ct_dynunet"], **TINY_RUN, "datalist": tiny_ct.mediastinum, "ckpt_dir": str(tuned)}
    finetune = {"foundation_checkpoint": str(foundation), "method": "dgst", "shots": SHOTS}
    run_checked(bundle_workflow(source, ["train", "finetune"], "train", **finetune, **run))
    assert (tuned / "training_record.json").is_file(), "the fine-tune run must write its training record"
    run_checked(bundle_workflow(source, ["train", "evaluate"], "eval", **run))
    output = base / "out" / f"{SITE}.zip"
    export_bundle(
        source,
        tuned / "model.pt",
        output,
        evaluation=tuned / "eval" / "summary.json",
        check_overrides={"datalist": tiny_ct.hn, "num_validation": 1},
    )
    unzipped = base / "unzipped"
    unzipped.mkdir()
    with zipfile.ZipFile(output) as archive:
        archive.extractall(unzipped)
    return SimpleNamespace(source=source, tuned=tuned, output=output, unzipped=unzipped, root=unzipped / SITE)


def test_exported_bundle_unzips_alone_and_passes_the_model_zoo_checks(exported, tiny_ct):
    """One bundle folder in the zip, no link, no file over 25 MB; train and infer workflows initialise with
    every property; verify_net_in_out as the zoo's CI runs it (default n); the weights are the checkpoint's."""
    root = exported.root
    assert [p.name for p in exported.unzipped.iterdir()] == [SITE]
    files = [p for p in root.rglob("*") if not p.is_dir()]
    assert [p for p in files if p.is_symlink()] == []
    assert max(p.stat().st_size for p in files) <= 25_000_000
    for name in ("LICENSE", "configs/metadata.json", "docs/README.md", "large_files.yml", "models/model.ts"):
        assert (root / name).is_file(), name
    assert (root / "models" / "model.pt").read_bytes() == (exported.tuned / "model.pt").read_bytes()
    normalization = json.loads((root / "models" / "normalization.json").read_text(encoding="utf-8"))
    assert normalization == json.loads((exported.tuned / "normalization.json").read_text(encoding="utf-8"))

    for configs, workflow_type, overrides in (
        (["train"], "train", {"datalist": tiny_ct.hn, "num_validation": 1, "ckpt_dir": str(root / "run")}),
        (["inference"], "infer", {}),
    ):
        checked(bundle_workflow(root, configs, workflow_type, **overrides))
    verify_network(root)


def test_exported_configs_carry_the_trained_network_and_the_metadata_of_its_run(exported):
    """plan written out (the tiny preset the checkpoint was trained with, no preset key left); a new version
    whose changelog names method, shots and data; eval_metrics from the evaluation summary."""
    root = exported.root
    tiny = plan_preset("tiny").to_config()
    for name in ("train", "inference"):
        config = json.loads((root / "configs" / f"{name}.json").read_text(encoding="utf-8"))
        assert config["plan"] == tiny and "preset" not in config, name
    assert not (root / "configs" / "cpu_small.json").exists()  # an overlay that could no longer apply

    source = json.loads((exported.source / "configs" / "metadata.json").read_text(encoding="utf-8"))
    metadata = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    major, minor, patch = (int(v) for v in source["version"].split("."))
    assert metadata["version"] == f"{major}.{minor}.{patch + 1}"
    assert list(metadata["changelog"]) == [metadata["version"], *source["changelog"]]
    entry = metadata["changelog"][metadata["version"]]
    assert "DGST" in entry and f"{SHOTS} shots" in entry and "dgst_synthetic_mediastinum" in entry
    summary = json.loads((exported.tuned / "eval" / "summary.json").read_text(encoding="utf-8"))
    means = {"mean_dice": summary["dice"]["mean"], "mean_nsd_1mm": summary["nsd_1mm"]["mean"]}
    assert metadata["eval_metrics"] == means
    shape = metadata["network_data_format"]["inputs"]["image"]["spatial_shape"]
    assert shape == list(PATCH["ln_ct_dynunet"])


def _mask(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_model_ts_and_model_pt_give_the_source_checkpoints_masks(exported, tiny_ct, tmp_path):
    """On a synthetic CT: the source bundle with the fine-tuned checkpoint, the exported bundle as it is
    (models/model.pt) and the exported bundle running models/model.ts write the same mask."""
    image = str(Path(tiny_ct.mediastinum).parent / "imagesTs" / "mediastinum_0002.nii.gz")
    checkpoint = str(exported.tuned / "model.pt")
    (source,) = predict(exported.source, image, tmp_path / "source", checkpoint=checkpoint, preset="tiny")
    (from_pt,) = predict(exported.root, image, tmp_path / "pt")
    torchscript = {
        "network_def": "$torch.jit.load(@bundle_root + '/models/model.ts')",
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],  # no CheckpointLoader: weights in .ts
    }
    (from_ts,) = predict(exported.root, image, tmp_path / "ts", **torchscript)
    expected = _mask(source)
    assert 0 < expected.mean() < 1, "a mask of one label would make the comparison vacuous"
    np.testing.assert_array_equal(_mask(from_pt), expected)
    np.testing.assert_array_equal(_mask(from_ts), expected)


def test_export_with_a_preset_overlay_merges_it_and_checks_the_checkpoint(tiny_ct, tmp_path, caplog):
    """--preset cpu_small (an overlay config) is merged into train.json; a checkpoint of another network, or a
    preset that contradicts the training record, is refused before anything is written."""
    root = BUNDLES / "ln_ct_dynunet"
    ckpt = _foundation(root, tmp_path / "small", tiny_ct.hn, preset="cpu-small")
    output = tmp_path / "out" / "small_site.zip"
    checks = {"datalist": tiny_ct.hn, "num_validation": 1}
    with pytest.raises(ValueError, match=r"(?s)does not fit the network.*--preset"):
        export_bundle(root, ckpt, output, changelog="pre-trained", check_overrides=checks)  # the default: paper
    assert not output.exists()
    with pytest.raises(ValueError, match="changelog"):
        export_bundle(root, ckpt, output, preset="cpu_small")  # no training record: nothing to say what it is

    with caplog.at_level(logging.WARNING, logger="dgst_monai.bundle.export"):
        export_bundle(root, ckpt, output, preset="cpu_small", changelog="pre-trained", check_overrides=checks)
    assert "the exported bundle carries no eval_metrics" in caplog.text  # no evaluation given: said
    with zipfile.ZipFile(output) as archive:
        train = json.loads(archive.read("small_site/configs/train.json"))
        assert json.loads(archive.read("small_site/configs/metadata.json"))["eval_metrics"] == {}
    overlay = json.loads((root / "configs" / "cpu_small.json").read_text(encoding="utf-8"))
    assert train["plan"] == plan_preset("cpu-small").to_config()
    assert {k: train[k] for k in overlay if k != "preset"} == {k: v for k, v in overlay.items() if k != "preset"}

    save_training_record(ckpt.parent, {"plan": plan_preset("cpu-small"), "method": None, "datalist": tiny_ct.hn})
    with pytest.raises(ValueError, match="leave out --preset"):
        export_bundle(root, ckpt, output, preset="tiny")


def test_training_record_stores_plans_as_configs_and_cases_as_ids(tmp_path):
    """The record holds the plan's to_config() and the case ids of datalist entries (not scan paths)."""
    cases = [{"case_id": "site_0001", "image": "/scans/a.nii.gz"}, {"image": "/scans/site_0002.nii.gz"}]
    path = save_training_record(tmp_path, {"plan": plan_preset("tiny"), "cases": cases, "method": "dgst", "shots": 2})
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    assert record["plan"] == plan_preset("tiny").to_config()
    assert record["cases"] == ["site_0001", "site_0002"]
    assert (record["method"], record["shots"]) == ("dgst", 2)
    with pytest.raises(TypeError, match="optimizer"):
        save_training_record(tmp_path, {"optimizer": object()})


def test_verify_bundle_lists_links_and_files_over_the_zoo_limit(exported, tmp_path):
    """A symbolic link and a file over 25 MB are both reported, naming the files."""
    root = tmp_path / SITE
    shutil.copytree(exported.root, root)
    (root / "docs" / "big.bin").write_bytes(b"\0" * 25_000_001)
    (root / "docs" / "link.md").symlink_to(root / "docs" / "README.md")
    with pytest.raises(BundleCheckError, match=r"(?s)docs/big\.bin is 25\.0 MB.*docs/link\.md is a symbolic link"):
        verify_bundle(root)


def _export_command(bundle: str, tmp_path, *extra: str) -> list[str]:
    """``python -m monai.bundle ckpt_export network_def ...`` as documented, with the tiny preset."""
    root = BUNDLES / bundle
    overrides = [a for k, v in TINY_NETWORK[bundle].items() for a in (f"--{k}", str(v))]
    return [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(tmp_path / "model.pt"),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root), *overrides, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("bundle", ["ln_ct_dynunet", "ln_ct_swinunetr"])
def test_ckpt_export_round_trip_equals_the_checkpoint(bundle, tmp_path):
    """ckpt_export loads the training checkpoint strictly into the inference network and model.ts gives the
    training network's output. DynUNet is scripted (in-process API); SwinUNETR is traced, through the command
    line as documented (``--use_trace true``), at the patch the sliding window feeds it."""
    root = BUNDLES / bundle
    torch.manual_seed(0)
    trained = _network(root, "train").eval()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    if bundle == "ln_ct_swinunetr":
        shape = str([1, 1, *PATCH[bundle]]).replace(" ", "")
        command = _export_command(bundle, tmp_path, "--use_trace", "true", "--input_shape", shape)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp_path / "model.ts"),
            ckpt_file=str(tmp_path / "model.pt"),
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            bundle_root=str(root),
            **TINY_NETWORK[bundle],
        )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 1, *PATCH[bundle])  # batch 2, as the sliding window (sw_batch_size 2) feeds it
    with torch.no_grad():
        expected, actual = trained(x), exported(x)
    assert actual.shape == (2, 2, *PATCH[bundle])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bundle", "preset"), [("ln_ct_dynunet", "paper"), ("ln_ct_swinunetr", "tiny")])
def test_shipped_metadata_fits_the_network_as_the_zoo_ci_checks_it(bundle, preset):
    """verify_net_in_out with the model zoo CI's defaults (n=1: the smallest shape the metadata allows) on the
    shipped network; SwinUNETR at its tiny size, which downsamples by the same 32."""
    verify_network(BUNDLES / bundle, preset=preset)
