"""MONAI Label tasks around our bundle configs: segmentation and DGST fine-tuning.

Segmentation runs ``inference.json``; fine-tuning runs ``train.json`` + ``finetune.json``.

Neither task uses MONAI Label's bundle tasks: those put an ``image_path`` string into the data dictionary (MONAI
1.6's ``Spacingd`` then fails on it), drop the bundle's ``SaveImaged`` (the label comes back as float32) and
search the model zoo. Here the bundle's own workflow runs unchanged: the mask is the bundle's uint8 output in
the input's exact geometry, voxel for voxel what ``dgst-monai predict`` writes with the same weights.

Inference runs one scan at a time per server (the two CPU cores gain nothing from more, and the network and
evaluator are reused), from whichever thread the web application hands it. Fine-tuning runs in the process
MONAI Label starts for each training request; its final checkpoint is published for the next inference
(:meth:`dgst_monai.serve.layout.ModelFolder.publish`).

Example::

    from dgst_monai.serve.layout import ModelFolder
from dgst_monai.serve.scans import DATALIST_LABELS
    from dgst_monai.serve.tasks import LymphNodeSegmentation

    task = LymphNodeSegmentation(ModelFolder("ct_app/model/ln_ct_dynunet"))
    mask, params = task({"image": "ct_app_studies/case_0001.nii.gz"})
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.train import TrainTask

from dgst_monai.data.cases import strip_volume_suffix
from dgst_monai.files import atomic_write_json
from dgst_monai.serve.layout import ModelFolder
from dgst_monai.serve.scans import DATALIST_LABELS

__all__ = ["SERVER_KEYS", "FinetuneTask", "LymphNodeSegmentation", "finetune_overrides"]

logger = logging.getLogger(__name__)

#: One inference at a time in this process, whichever model.
_COMPUTE = threading.Lock()
#: The labels of every served model, as MONAI Label clients read them.
LABELS = {"lymph_node": 1}
#: Config keys the server sets for a fine-tune; a request may not.
SERVER_KEYS = frozenset(
    {"bundle_root", "ckpt_dir", "output_dir", "dataset_dir", "datalist", "foundation_checkpoint", "preset", "resume"}
)
#: The fine-tuning settings a client shows (``FinetuneTask.config``), with the bundle's defaults.
_SHOWN_SETTINGS = ("method", "gamma", "update", "learning_rate", "max_epochs", "iterations_per_epoch", "seed")
#: Keys MONAI Label itself adds to a training request.
_MONAI_LABEL_KEYS = frozenset({"model", "gpus", "local_rank", "bundle_path", "device", "multi_gpu"})


class _Predictor:
    """A bundle's ``inference.json`` parsed once for one checkpoint; its evaluator then runs scan by scan."""

    def __init__(self, folder: ModelFolder, checkpoint: Path) -> None:
        from monai.bundle import ConfigParser

        self.checkpoint = checkpoint
        self.output_dir = Path(tempfile.mkdtemp(prefix=f"{folder.name}-"))
        parser = ConfigParser()
        parser.read_config(str(folder.configs / "inference.json"))
        overrides: dict[str, Any] = {
            "bundle_root": str(folder.root),
            "checkpoint": str(checkpoint),
            "output_dir": str(self.output_dir),
            "datalist": [],
        }
        if folder.preset is not None:
            overrides["preset"] = folder.preset
        for key, value in overrides.items():
            parser[key] = value
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.evaluator = parser.get_parsed_content("evaluator")
        self.postfix = str(parser.get_parsed_content("output_postfix"))
        # the same workflow stopped before the argmax, for the softmax itself (active learning)
        steps = parser["postprocessing"]["transforms"]
        parser["postprocessing"]["transforms"] = steps[: next(i for i, t in enumerate(steps) if "AsDiscrete" in t["_target_"])]
        self._softmax_evaluator = parser.get_parsed_content("evaluator", lazy=False)
        self._softmax_preprocessing = parser.get_parsed_content("preprocessing")  # the one its Invertd inverts

    def __call__(self, image: str) -> Path:
        """Segment one scan; the bundle's mask file, in this predictor's output folder."""
        from monai.data import DataLoader, Dataset

        from dgst_monai.predict import mask_path

        loader = DataLoader(Dataset([{"image": image}], transform=self.preprocessing), batch_size=1, num_workers=0)
        # the evaluator was built on the config's empty dataset; MONAI skips a run whose epoch length is 0
        self.evaluator.data_loader = loader
        self.evaluator.state.epoch_length = len(loader)
        self.evaluator.run()
        written = mask_path(image, self.output_dir, self.postfix)
        if not written.is_file():
            raise RuntimeError(f"the bundle's inference did not write {written}")
        return written

    def probabilities(self, image: str) -> np.ndarray:
        """The foreground probability of one scan on its own grid, (x, y, z) float32."""
        from monai.data import DataLoader, Dataset

        data = Dataset([{"image": image}], transform=self._softmax_preprocessing)
        loader = DataLoader(data, batch_size=1, num_workers=0)
        self._softmax_evaluator.data_loader = loader
        self._softmax_evaluator.state.epoch_length = len(loader)
        self._softmax_evaluator.run()
        return np.asarray(self._softmax_evaluator.state.output[0]["pred"][1].detach().cpu(), dtype=np.float32)

    def close(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)


class LymphNodeSegmentation(InferTask):
    """Segment lymph nodes with a served bundle (MONAI Label ``/infer/<model>``).

    Every request uses the model's served weights (:meth:`ModelFolder.served`): after a fine-tune is
    published, the next request loads it.

    Args:
        folder: the model's folder in the app.
    """

    def __init__(self, folder: ModelFolder) -> None:
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=dict(LABELS),
            dimension=3,
            description=f"CT lymph-node segmentation ({folder.name}), fine-tunable with DGST from your labels",
        )
        self.folder = folder
        self._predictor: _Predictor | None = None

    def is_valid(self) -> bool:
        return self.folder.foundation.is_file()

    def get_path(self, validate: bool = True) -> str | None:
        """The served weights (MONAI Label's ``/model/<name>`` reports their checksum)."""
        path = self.folder.served()
        return str(path) if path.is_file() or not validate else None

    def _predictor_for(self, checkpoint: Path) -> _Predictor:
        if self._predictor is None or self._predictor.checkpoint != checkpoint:
            if self._predictor is not None:
                self._predictor.close()
            logger.info(f"{self.folder.name}: loading {checkpoint}")
            self._predictor = _Predictor(self.folder, checkpoint)
        return self._predictor

    def probabilities(self, image: str) -> np.ndarray:
        """The served weights' foreground probability for a scan (active learning), one scan at a time."""
        with _COMPUTE:
            return self._predictor_for(self.folder.served()).probabilities(image)

    def __call__(self, request: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Segment ``request["image"]`` (a file path); return a uint8 mask file in the scan's geometry and the
        parameters reported to the client (the weights used)."""
        image = str(request["image"])
        start = time.perf_counter()
        with _COMPUTE:
            checkpoint = self.folder.served()
            written = self._predictor_for(checkpoint)(image)
            # a name of its own: MONAI Label deletes the file once it is sent, and the next request of the same
            # scan writes the bundle's file name again
            fd, result = tempfile.mkstemp(prefix=f"{self.folder.name}_", suffix=".nii.gz")
            os.close(fd)
            os.replace(written, result)
        return result, {
            "model": self.folder.name,
            "checkpoint": checkpoint.relative_to(self.folder.root).as_posix(),
            "labels": dict(LABELS),
            "latency_s": round(time.perf_counter() - start, 3),
        }


def _plain_values(folder: ModelFolder) -> dict[str, Any]:
    """Top-level keys of ``train.json`` overlaid by ``finetune.json`` that hold a plain value (not a component),
    minus those the server sets: what a training request may override."""
    values: dict[str, Any] = {}
    for name in ("train.json", "finetune.json"):
        config = json.loads((folder.configs / name).read_text(encoding="utf-8"))
        values.update(
            (key, value)
            for key, value in config.items()
            if not isinstance(value, (dict, list)) and not key.startswith(("+", "_")) and "#" not in key
        )
    return {key: value for key, value in values.items() if key not in SERVER_KEYS}


def finetune_overrides(folder: ModelFolder, request: Mapping[str, Any], labelled: int) -> dict[str, Any]:
    """The finetune-config overrides of a training request, checked.

    ``method`` defaults to the bundle's (``dgst``) and ``shots`` to every labelled study; any other plain key of
    the bundle's ``train.json`` / ``finetune.json`` (``gamma``, ``max_epochs``, ``iterations_per_epoch``,
    ``learning_rate``, ``seed``, ...) may be given as a JSON scalar. The keys that place files are the server's.

    Args:
        folder: the model's folder.
        request: the request's parameters (MONAI Label's own keys are ignored).
        labelled: the number of studies with a submitted (``final``) label.

    Returns:
        The overrides, with ``method`` and ``shots`` always set.

    Raises:
        ValueError: unknown method or key, a key the server sets, a non-scalar value, or ``shots`` not between
            1 and ``labelled``.
    """
    from dgst_monai.methods import METHODS

    given = {k: v for k, v in request.items() if k not in _MONAI_LABEL_KEYS}
    refused = sorted(set(given) & SERVER_KEYS)
    if refused:
        raise ValueError(f"{', '.join(refused)} set by the server for every fine-tune; leave them out")
    defaults = _plain_values(folder)
    allowed = set(defaults)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(
            f"unknown fine-tuning parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    not_scalar = sorted(k for k, v in given.items() if v is not None and not isinstance(v, (bool, int, float, str)))
    if not_scalar:
        raise ValueError(f"parameter(s) {', '.join(not_scalar)} must be a number, string or boolean")
    method = given.setdefault("method", defaults["method"])
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if labelled < 1:
        raise ValueError("no study has a submitted label yet: PUT /datastore/label?image=<id> first")
    shots = given.setdefault("shots", labelled)
    if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= labelled:
        raise ValueError(f"shots must be an integer between 1 and the {labelled} labelled studies, got {shots!r}")
    return given


class FinetuneTask(TrainTask):
    """Fine-tune the served foundation model on the labelled studies (MONAI Label ``/train/<model>``).

    Runs the bundle's ``train.json`` + ``finetune.json`` (the chosen registry method, DGST by default) from the
    foundation weights on the studies with a ``final`` label, writes a new ``models/finetuned/<run>/`` and
    publishes its ``model.pt``. The foundation file is only read.

    Args:
        folder: the model's folder in the app.
    """

    def __init__(self, folder: ModelFolder) -> None:
        super().__init__(f"Fine-tune {folder.name} on the labelled studies (method dgst by default)")
        self.folder = folder

    def config(self) -> dict[str, Any]:
        """The fine-tune's main settings with the bundle's defaults, which clients show and send back as the
        request (``shots`` defaults to every labelled study)."""
        defaults = _plain_values(self.folder)
        return {key: defaults[key] for key in _SHOWN_SETTINGS if not str(defaults[key]).startswith(("$", "@"))}

    def stats(self) -> dict[str, Any]:
        served = self.folder.served()
        return {
            "served": served.relative_to(self.folder.root).as_posix(),
            "fine_tuned": served != self.folder.foundation,
        }

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        from monai.bundle import ConfigWorkflow

        # a PACS datastore also names each case's study, label source (RTSTRUCT / SEG series or "submitted") and
        # the structures used: the training record keeps them
        provenance = ("study", "source", "structures")
        cases = [
            {"case_id": strip_volume_suffix(Path(e["image"]).name), "image": e["image"], "label": e["label"],
             **{key: e[key] for key in provenance if key in e}}
            for e in datastore.datalist()
        ]
        overrides = finetune_overrides(self.folder, request, len(cases))
        run_dir = self.folder.new_finetune(str(overrides["method"]), int(overrides["shots"]))
        datalist = atomic_write_json(
            run_dir / "datalist.json", {"labels": DATALIST_LABELS, "training": cases}
        )
        server_set: dict[str, Any] = {
            "bundle_root": str(self.folder.root),
            "datalist": str(datalist),
            "foundation_checkpoint": str(self.folder.foundation),
            "ckpt_dir": str(run_dir),
            "num_workers": 0,
        }
        if self.folder.preset is not None:
            server_set["preset"] = self.folder.preset
        start = time.perf_counter()
        logger.info(f"{self.folder.name}: fine-tuning {overrides} on {len(cases)} labelled studies into {run_dir}")
        workflow = ConfigWorkflow(
            config_file=[str(self.folder.configs / "train.json"), str(self.folder.configs / "finetune.json")],
            meta_file=str(self.folder.configs / "metadata.json"),
            logging_file=str(self.folder.configs / "logging.conf"),
            workflow_type="train",
            **{**server_set, **overrides},
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        published = self.folder.publish(run_dir / "model.pt")
        return {
            "checkpoint": published.relative_to(self.folder.root).as_posix(),
            "cases": [case["case_id"] for case in cases],
            "labels": [{key: case[key] for key in ("case_id", *provenance) if key in case} for case in cases],
            "seconds": round(time.perf_counter() - start, 1),
            **overrides,
        }
