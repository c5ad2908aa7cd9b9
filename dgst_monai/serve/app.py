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

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from dgst_monai.serve.layout import ModelFolder, app_models
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
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="dgst-monai lymph nodes",
            description="CT lymph-node segmentation foundation models, fine-tuned with DGST on your labels",
            version="0.1.0",
            labels=["lymph_node"],
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {name: LymphNodeSegmentation(folder) for name, folder in self.models.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: FinetuneTask(folder) for name, folder in self.models.items()}

    def labelled_studies(self) -> int:
        """How many studies have a submitted (``final``) label: what a fine-tune trains on."""
        return len(self.datastore().datalist())
