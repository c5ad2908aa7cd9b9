"""Ignite handler: the full training state saved atomically every epoch, and resuming from the latest one."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader
from torch import nn

__all__ = ["TrainingStateCheckpoint", "latest_training_state"]


def _state_files(save_dir: str | os.PathLike[str], prefix: str) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``<prefix>_epoch=<N>.pt`` in ``save_dir``, oldest first."""
    folder = Path(save_dir)
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}_epoch=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_training_state(save_dir: str | os.PathLike[str], prefix: str = "training_state") -> Path | None:
    """The training-state file of the highest epoch in ``save_dir`` (None if there is none).

    Args:
        save_dir: the folder :class:`TrainingStateCheckpoint` saves to.
        prefix: its file prefix.
    """
    files = _state_files(save_dir, prefix)
    return files[-1][1] if files else None


class TrainingStateCheckpoint:
    """Save the whole training state atomically every ``interval`` epochs; with ``resume=True`` continue from
    the latest one.

    The state is ``save_dict`` (typically the model, optimizer and lr scheduler) plus the trainer itself
    (``"trainer"``: epoch, iteration, epoch length) and, under AMP, its gradient scaler (``"scaler"``). It is
    written as ``<save_dir>/<prefix>_epoch=<N>.pt`` by ignite's ``DiskSaver(atomic=True)``: serialized to a
    temporary file in the same folder, then renamed over the target, so an interruption leaves the previous
    complete file, never a partial one (MONAI's ``CheckpointSaver`` writes non-atomically). After each save the
    older state files of this prefix beyond the ``n_saved`` newest are removed. Saving is registered when the run
    starts, so it follows every other end-of-epoch handler attached before (the lr scheduler has stepped, the
    validation has run): the saved state is the one the next epoch starts from. The file is the usual nested
    checkpoint ``{"model": ..., "optimizer": ..., ...}``, loadable with MONAI's ``CheckpointLoader``.

    With ``resume=True``, when the run starts the latest state file is loaded into the same objects with
    MONAI's ``CheckpointLoader``; the trainer then continues with the epoch after the saved one, and
    ``max_epochs`` stays the configured value (it must exceed the saved epoch). A missing state file is an
    error rather than a silent fresh start. Handlers attached later that also act when the run starts (e.g. a
    ``CheckpointLoader`` of pre-trained weights) run after this one: disable them when resuming. Resuming is
    meant for continuing the same run: saved objects keep their saved settings (e.g. the lr scheduler's length).

    Under torch.distributed every rank loads and only rank 0 writes. Attach it on every rank: ignite's first
    distributed query is a collective operation (if other handlers query ignite on rank 0 only, call
    ``ignite.distributed.sync()`` on every rank after ``init_process_group``, as the bundles'
    ``multi_gpu_train.json`` does).

    Args:
        save_dir: folder of the state files (created if missing).
        save_dict: objects to save besides the trainer, e.g. ``{"model": net, "optimizer": opt,
            "lr_scheduler": sched}``; a DistributedDataParallel model is saved unwrapped.
        resume: whether to load the latest state file when the run starts.
        interval: save every ``interval`` epochs.
        n_saved: number of state files to keep (the newest).
        prefix: file-name prefix.
        map_location: ``torch.load`` map location when resuming (e.g. the run's device).
        name: logger name; by default the engine's logger.

    Raises:
        ValueError: for a non-positive ``interval`` or ``n_saved``, or ``save_dict`` naming ``trainer``/``scaler``.

    Example::

        trainer = SupervisedTrainer(..., network=net, optimizer=opt)
        TrainingStateCheckpoint("runs/models", {"model": net, "optimizer": opt, "lr_scheduler": sched},
                                resume=True, map_location="cpu").attach(trainer)
        trainer.run()  # continues from runs/models/training_state_epoch=<latest>.pt
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        save_dict: Mapping[str, Any],
        resume: bool = False,
        interval: int = 1,
        n_saved: int = 1,
        prefix: str = "training_state",
        map_location: Any = None,
        name: str | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be a positive number of epochs, got {interval!r}")
        if isinstance(n_saved, bool) or not isinstance(n_saved, int) or n_saved < 1:
            raise ValueError(f"n_saved must be a positive integer, got {n_saved!r}")
        reserved = {"trainer", "scaler"} & set(save_dict)
        if reserved:
            raise ValueError(f"save_dict must not use the keys {sorted(reserved)}: the handler adds them itself")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.interval = interval
        self.n_saved = n_saved
        self.prefix = prefix
        self.map_location = map_location
        self.logger = logging.getLogger(name)
        self._name = name
        self._saver: DiskSaver | None = None

    def attach(self, engine: Engine) -> None:
        """Register loading when the run starts (if ``resume``) and saving every ``interval`` epochs.

        Args:
            engine: the trainer.
        """
        if self._name is None:
            self.logger = engine.logger
        # built on every rank: ignite's first distributed query is collective, so it must not happen on rank 0 only
        self._saver = DiskSaver(self.save_dir, atomic=True, create_dir=True, require_empty=False)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.STARTED, self._register_saving)

    def _register_saving(self, engine: Engine) -> None:
        # registered when the run starts, after every handler attached before it: the state is then saved after
        # the other end-of-epoch handlers (lr scheduler step, validation) have run
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = dict(self.save_dict, trainer=engine)
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            objects["scaler"] = scaler
        return objects

    def load(self, engine: Engine) -> None:
        """Load the latest state file into the objects and the trainer.

        Raises:
            FileNotFoundError: if ``save_dir`` has no state file.
        """
        path = latest_training_state(self.save_dir, self.prefix)
        if path is None:
            raise FileNotFoundError(
                f"resume was requested but {self.save_dir} holds no training state ({self.prefix}_epoch=<N>.pt); "
                "run without resume to start from scratch, or point ckpt_dir at the interrupted run"
            )
        CheckpointLoader(load_path=str(path), load_dict=self._objects(engine), map_location=self.map_location)(engine)
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def __call__(self, engine: Engine) -> None:
        """Save the state of the epoch just completed (rank 0 only) and remove older state files."""
        state = {}
        for key, obj in self._objects(engine).items():
            if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
                obj = obj.module
            state[key] = obj.state_dict()
        if self._saver is None:
            raise RuntimeError("TrainingStateCheckpoint must be attached to the trainer before it runs")
        epoch = engine.state.epoch
        filename = f"{self.prefix}_epoch={epoch}.pt"
        self._saver(state, filename)  # writes on rank 0 only
        if idist.get_rank() != 0:
            return
        for old_epoch, old in _state_files(self.save_dir, self.prefix)[: -self.n_saved]:
            if old_epoch != epoch:
                old.unlink(missing_ok=True)
        self.logger.debug(f"saved the training state of epoch {epoch} to {self.save_dir / filename}")

