"""``python -m monai.bundle run ... --tracking mlflow``: MONAI's own MLflow settings on the bundle's train and
finetune configs record the run's settings (method, gamma, shots) and DGST's updated fraction per epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import monai.bundle
from bundle_support import BUNDLES, TINY_NETWORK, TINY_RUN

BUNDLE = "ln_ct_dynunet"

def _monai_bundle_run(tmp_path: Path, configs: list[str], **overrides: Any) -> None:
    """``python -m monai.bundle run`` exactly as typed in a shell (values as Python literals, as fire reads them)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs)]
    for key, value in {**_bundle_files(), **overrides}.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _bundle_files() -> dict[str, str]:
    root = BUNDLES / BUNDLE
    return {
        "meta_file": str(root / "configs" / "metadata.json"),
        "logging_file": str(root / "configs" / "logging.conf"),
        "bundle_root": str(root),
    }


def test_tracking_mlflow_records_method_gamma_and_updated_fraction(tiny_ct, tmp_path):
    """Pre-train, then fine-tune with DGST from the command line, both with ``--tracking mlflow`` into one local
    store file (SQLite, MONAI's default: MONAI 1.6 and MLflow 3.13+ refuse the folder store); read with MLflow's
    client, it holds one finished run each, with the bundle's settings as parameters and its metrics, DGST's
    updated fraction once per epoch."""
    configs = BUNDLES / BUNDLE / "configs"
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking = dict(tracking="mlflow", tracking_uri=store, output_dir=str(tmp_path / "eval"))
    foundation, tuned = tmp_path / "foundation", tmp_path / "tuned"

    # pre-training in this process: monai.bundle.run is what the command line calls (and saves an interpreter start)
    monai.bundle.run(
        config_file=[str(configs / "train.json")],
        **_bundle_files(),
        datalist=tiny_ct.hn,
        ckpt_dir=str(foundation),
        **tracking,
        **TINY_NETWORK[BUNDLE],
        **TINY_RUN,
    )
    _monai_bundle_run(
        tmp_path,
        [str(configs / "train.json"), str(configs / "finetune.json")],
        datalist=tiny_ct.mediastinum,
        foundation_checkpoint=str(foundation / "model.pt"),
        ckpt_dir=str(tuned),
        method="dgst",
        gamma=1,
        shots=1,
        **tracking,
        **TINY_NETWORK[BUNDLE],
        **dict(TINY_RUN, max_epochs=2),
    )

    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("monai_experiment")  # MONAI's default experiment name
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    pretrain, finetune = runs

    assert "method" not in pretrain.data.params and pretrain.data.params["preset"] == "tiny"
    assert "train_loss" in pretrain.data.metrics and "val_mean_dice" in pretrain.data.metrics
    assert "updated_fraction" not in pretrain.data.metrics

    params = finetune.data.params
    assert (params["method"], params["gamma"], params["shots"], params["update"]) == ("dgst", "1", "1", "strict")
    assert params["max_epochs"] == "2" and params["foundation_checkpoint"] == str(foundation / "model.pt")
    history = client.get_metric_history(finetune.info.run_id, "updated_fraction")
    # one value per epoch, logged in the epoch it was measured; strict DGST keeps the same number of entries
    # (gamma per filter plus the always-updated biases, norms and heads) at every step
    assert sorted(m.step for m in history) == [1, 2]
    assert history[0].value == history[1].value and 0.0 < history[0].value < 0.1
