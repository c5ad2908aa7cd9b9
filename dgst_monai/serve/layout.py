"""The MONAI Label app folder that ``dgst-monai serve`` runs, and which weights each served model uses.

Layout (everything the server writes stays in this folder)::

    <app>/main.py                      one import: MONAI Label finds the app class there
    <app>/serve.json                   the served models, in order
    <app>/tmp/                         the server's temporary folder (TMPDIR), emptied at every start
    <app>/model/<bundle>/configs/      the bundle's configs, copied at every start
    <app>/model/<bundle>/serve.json    network preset and foundation checksum
    <app>/model/<bundle>/models/model.pt (+ normalization.json)     the foundation model, never written again
    <app>/model/<bundle>/models/finetuned/<run>/model.pt (+ ...)   one folder per fine-tune
    <app>/model/<bundle>/models/serving.json                       the fine-tune being served, if any

A fine-tune is published by replacing ``serving.json`` atomically once its final checkpoint exists, so an
inference sees either the previous weights or the new ones. ``serving.json`` names the foundation it was tuned
from (its SHA-256): after the foundation is replaced, the stale fine-tunes stay on disk but are not served.

Example::

    from dgst_monai.serve.layout import ModelFolder, ServedBundle, lay_out_app

    app = lay_out_app("ct_app", [ServedBundle.from_paths("bundles/ln_ct_dynunet", "model.pt", preset="tiny")])
    folder = ModelFolder(app / "model" / "ln_ct_dynunet")
    print(folder.served())   # .../models/model.pt until a fine-tune is published
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_open, atomic_write, atomic_write_json, read_json
from dgst_monai.normalization import NORMALIZATION_FILE

__all__ = ["APP_FILE", "ModelFolder", "ServedBundle", "app_models", "app_settings", "lay_out_app"]

#: The app's ``main.py``: MONAI Label imports it and takes the class whose direct base is ``MONAILabelApp``.
APP_MAIN = "from dgst_monai.serve.app import LymphNodeApp  # noqa: F401 - MONAI Label looks for the app class here\n"
#: The list of served models in the app folder.
APP_FILE = "serve.json"
#: What a bundle needs to be served and fine-tuned.
REQUIRED_CONFIGS = ("inference.json", "train.json", "finetune.json", "metadata.json")
#: The parts of a bundle copied into the app (never its models/, data/ or eval/ outputs).
BUNDLE_PARTS = ("configs", "docs", "LICENSE")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ServedBundle:
    """One bundle to serve: its folder, the foundation weights and the network preset they were trained with.

    Attributes:
        bundle: the bundle folder (``configs/inference.json``, ``train.json``, ``finetune.json``).
        checkpoint: the foundation weights, with ``normalization.json`` beside them.
        preset: the bundle's ``preset`` the weights belong to (``paper``, ``cpu-small``, ``tiny``); None keeps
            the bundle's own.
    """

    bundle: Path
    checkpoint: Path
    preset: str | None = None

    @property
    def name(self) -> str:
        """The model name clients use (``/infer/<name>``): the bundle folder's name."""
        return self.bundle.name

    @classmethod
    def from_paths(
        cls, bundle: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None, preset: str | None = None
    ) -> ServedBundle:
        """Check a bundle folder and its weights (default ``<bundle>/models/model.pt``).

        Raises:
            FileNotFoundError: a config, the checkpoint or its ``normalization.json`` is missing.
        """
        root = Path(bundle).expanduser().resolve()
        missing = [name for name in REQUIRED_CONFIGS if not (root / "configs" / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{root} is not a servable bundle: configs/{', configs/'.join(missing)} missing")
        weights = Path(checkpoint).expanduser().resolve() if checkpoint else root / "models" / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint {weights} not found: pass the foundation weights with --checkpoint")
        if not (weights.parent / NORMALIZATION_FILE).is_file():
            raise FileNotFoundError(
                f"{weights.parent / NORMALIZATION_FILE} not found: the bundle's training writes it beside "
                f"{weights.name}; the served model needs the intensity normalisation it was trained with"
            )
        return cls(root, weights, preset)


class ModelFolder:
    """``<app>/model/<bundle>``: the bundle's configs, its foundation weights and its fine-tunes.

    Args:
        root: the folder.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.root.name

    @property
    def configs(self) -> Path:
        """The bundle's ``configs/`` folder."""
        return self.root / "configs"

    @property
    def foundation(self) -> Path:
        """The foundation weights (never written after the layout)."""
        return self.root / "models" / "model.pt"

    @property
    def finetunes(self) -> Path:
        """The folder holding one sub-folder per fine-tune."""
        return self.root / "models" / "finetuned"

    @property
    def _pointer(self) -> Path:
        return self.root / "models" / "serving.json"

    def settings(self) -> dict[str, Any]:
        """``serve.json`` of the model: ``preset`` and ``foundation_sha256``."""
        return read_json(self.root / APP_FILE, "served model settings")

    @property
    def preset(self) -> str | None:
        """The network preset of the served weights (None: the bundle's own)."""
        return self.settings().get("preset")

    def served(self) -> Path:
        """The weights to infer with: the published fine-tune of this foundation, else the foundation."""
        if self._pointer.is_file():
            pointer = read_json(self._pointer, "serving pointer")
            checkpoint = self.root / "models" / pointer["checkpoint"]
            if pointer.get("foundation_sha256") == self.settings()["foundation_sha256"] and checkpoint.is_file():
                return checkpoint
        return self.foundation

    def new_finetune(self, method: str, shots: int) -> Path:
        """A new, empty folder for a fine-tune: ``finetuned/<time>_<method>_<shots>shot``."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(100):
            folder = self.finetunes / f"{stamp}_{method}_{shots}shot{f'_{attempt}' if attempt else ''}"
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise FileExistsError(f"could not create a fine-tune folder in {self.finetunes}")

    def publish(self, checkpoint: str | os.PathLike[str]) -> Path:
        """Serve ``checkpoint`` (a fine-tune's ``model.pt`` inside this folder) from the next inference on.

        Raises:
            ValueError: the checkpoint is not inside ``models/`` of this folder, or has no normalization.json.
        """
        path = Path(checkpoint).resolve()
        models = (self.root / "models").resolve()
        if models not in path.parents or not path.is_file():
            raise ValueError(f"cannot publish {path}: not a checkpoint file inside {models}")
        if not (path.parent / NORMALIZATION_FILE).is_file():
            raise ValueError(f"cannot publish {path}: no {NORMALIZATION_FILE} beside it")
        atomic_write_json(
            self._pointer,
            {
                "checkpoint": path.relative_to(models).as_posix(),
                "foundation_sha256": self.settings()["foundation_sha256"],
                "published": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        return path


def _copy_foundation(source: Path, folder: ModelFolder) -> None:
    """Copy the weights and their normalisation in, each file renamed into place when complete."""
    target = folder.foundation
    target.parent.mkdir(parents=True, exist_ok=True)
    for src, dst in ((source.parent / NORMALIZATION_FILE, target.parent / NORMALIZATION_FILE), (source, target)):
        with open(src, "rb") as reader, atomic_open(dst, "wb") as writer:
            shutil.copyfileobj(reader, writer)


def _lay_out_model(served: ServedBundle, folder: ModelFolder) -> None:
    folder.root.mkdir(parents=True, exist_ok=True)
    for part in BUNDLE_PARTS:  # the bundle as it is now: configs edited since the last start take effect
        src, dst = served.bundle / part, folder.root / part
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            shutil.copyfile(src, dst)
    sha = _sha256(served.checkpoint)
    previous = folder.settings() if (folder.root / APP_FILE).is_file() else {}
    if previous.get("foundation_sha256") != sha or not folder.foundation.is_file():
        _copy_foundation(served.checkpoint, folder)
    atomic_write_json(
        folder.root / APP_FILE,
        {"preset": served.preset, "foundation_sha256": sha, "source_checkpoint": str(served.checkpoint)},
    )


def lay_out_app(
    app_dir: str | os.PathLike[str], bundles: Sequence[ServedBundle], pacs: dict[str, Any] | None = None
) -> Path:
    """Write (or refresh) the MONAI Label app folder serving ``bundles``.

    Fine-tunes and the serving choice of a model survive a restart with the same foundation weights; the
    app's temporary folder is emptied.

    Args:
        app_dir: the app folder (created if missing).
        bundles: the bundles to serve; their folder names must differ.
        pacs: for a DICOMweb PACS as the studies: ``structures`` (globs that make prior contours labels) and
            ``store_format`` (``dicom-seg`` or ``rtstruct``), kept in ``serve.json``.

    Returns:
        The app folder, absolute.

    Raises:
        ValueError: no bundle, or two bundles with the same name.
    """
    if not bundles:
        raise ValueError("no bundle to serve: pass --bundle")
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise ValueError(f"two served bundles have the same folder name: {names}; model names must differ")
    app = Path(app_dir).expanduser().resolve()
    app.mkdir(parents=True, exist_ok=True)
    atomic_write(app / "main.py", APP_MAIN)
    shutil.rmtree(app / "tmp", ignore_errors=True)
    (app / "tmp").mkdir()
    for served in bundles:
        _lay_out_model(served, ModelFolder(app / "model" / served.name))
    atomic_write_json(app / APP_FILE, {"models": names, **({"pacs": pacs} if pacs is not None else {})})
    return app


def app_settings(app_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The app folder's ``serve.json``: ``models`` and, when serving a PACS, ``pacs``."""
    return read_json(Path(app_dir) / APP_FILE, "served app")


def app_models(app_dir: str | os.PathLike[str]) -> list[ModelFolder]:
    """The served models of an app folder written by :func:`lay_out_app`, in order."""
    app = Path(app_dir)
    return [ModelFolder(app / "model" / name) for name in app_settings(app)["models"]]
