"""The MONAI Label app: one segmentation model and one fine-tuning task per served bundle.

MONAI Label imports the app folder's ``main.py`` and instantiates the class there whose direct base class is
``MONAILabelApp`` (it looks no deeper), so :class:`LymphNodeApp` subclasses it directly and ``main.py`` only
imports it (:data:`dgst_monai.serve.layout.APP_MAIN`). The served models are those listed in the app folder's
``serve.json``; nothing is looked up in the model zoo or downloaded.

Example::

    from dgst_monai.serve.app import LymphNodeApp

    app = LymphNodeApp(app_dir="ct_app", studies="ct_studies", conf={})
    print(sorted(app.info()["models"]))   # ['ln_ct_dynunet']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

from dgst_monai.serve.active_learning import NodeEntropy
from dgst_monai.serve.layout import ModelFolder, app_models, app_settings
from dgst_monai.serve.pacs import PacsDatastore
from dgst_monai.serve.tasks import FinetuneTask, LymphNodeSegmentation

__all__ = ["LymphNodeApp"]


class LymphNodeApp(MONAILabelApp):
    """CT lymph-node segmentation, adapted to the site with DGST from the labels its clinicians submit.

    Args:
        app_dir: the app folder written by :func:`dgst_monai.serve.layout.lay_out_app`.
        studies: the studies folder (MONAI Label's local datastore).
        conf: MONAI Label's ``--conf`` pairs (unused).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.models: dict[str, ModelFolder] = {folder.name: folder for folder in app_models(app_dir)}
        self.pacs_settings: dict[str, Any] | None = app_settings(app_dir).get("pacs")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="dgst-monai lymph nodes",
            description="CT lymph-node segmentation foundation models, fine-tuned with DGST on your labels",
            version="0.1.0",
            labels=["lymph_node"],
        )

    def init_datastore(self) -> Datastore:
        """A DICOMweb PACS (``--studies http://.../dicom-web``): :class:`PacsDatastore`; a folder: MONAI Label's."""
        if self.studies.startswith(("http://", "https://")):
            settings = self.pacs_settings or {}
            return PacsDatastore(
                self.studies,
                Path(self.app_dir) / "pacs",
                structures=settings.get("structures"),
                store_format=settings.get("store_format", "dicom-seg"),
            )
        return super().init_datastore()

    def init_infers(self) -> dict[str, InferTask]:
        return {name: LymphNodeSegmentation(folder) for name, folder in self.models.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        tasks = self._infers  # MONAI Label builds the inference tasks first
        return {
            "random": Random(),
            "entropy": NodeEntropy(
                weights=lambda model: str(self.models[model].served()),
                probabilities=lambda model, study: tasks[model].probabilities(study),
                default_model=next(iter(self.models)),
            ),
        }

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's inference; on a PACS, the mask of a PACS study is also stored back into the PACS as a
        DICOM-SEG (or RTSTRUCT: ``store_format``) series of its study, named in the result's ``stored``."""
        store = datastore or self.datastore()
        image = request.get("image")
        result = super().infer(request, datastore)
        if isinstance(store, PacsDatastore) and isinstance(image, str) and image and not os.path.exists(image):
            stored = store.store_result(image, result["file"], request.get("store_format"))
            result["params"] = {**(result.get("params") or {}), "stored": stored}
        return result

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: FinetuneTask(folder) for name, folder in self.models.items()}

    def labelled_studies(self) -> int:
        """How many studies have a submitted (``final``) label: what a fine-tune trains on."""
        return len(self.datastore().datalist())
