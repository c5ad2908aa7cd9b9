"""Ignite handler: the full training state saved atomically every epoch, and resuming from the latest one."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from dgst_monai.bundle.config_values import flag
from dgst_monai.files import atomic_torch_save, remove_interrupted_writes
from dgst_monai.handlers.checkpoint_loader import SafeCheckpointLoader
from dgst_monai.handlers.random_state import RandomState

__all__ = ["AtomicDiskSaver", "TrainingStateCheckpoint", "latest_training_state"]

#: ``<prefix>_epoch=<N>.pt``, in ignite's filename-pattern syntax.
FILENAME_PATTERN = "{filename_prefix}_{score_name}={score}.{ext}"
_RESERVED = ("trainer", "scaler", "checkpointer")  # what the handler adds to the state itself


class AtomicDiskSaver(DiskSaver):
    """ignite's :class:`~ignite.handlers.DiskSaver` writing through :func:`dgst_monai.files.atomic_torch_save`,
    removing older files only once the new one is complete.

    ignite's own atomic mode writes an ``0o600`` temporary file and then adds read permission for everyone,
    whatever the umask, and does not fsync; this one fsyncs and gives the file the permissions ``open()`` would.
    ignite's :class:`~ignite.handlers.Checkpoint` asks to remove the oldest file *before* it writes the new one:
    with ``n_saved=1`` a kill while writing would leave no file at all. Here a removal waits until the next
    file has been written in full. Only rank ``save_on_rank`` writes and removes files.

    Args:
        dirname: folder of the files (created if missing).
        save_on_rank: the rank that writes.

    Example::

        Checkpoint({"model": net}, AtomicDiskSaver("runs/models"), n_saved=2)
    """

    def __init__(self, dirname: str | os.PathLike[str], save_on_rank: int = 0) -> None:
        super().__init__(Path(dirname), atomic=True, create_dir=True, require_empty=False, save_on_rank=save_on_rank)
        self._to_remove: list[str] = []

    def __call__(self, checkpoint: Mapping[str, Any], filename: str, metadata: Mapping[str, Any] | None = None) -> None:
        """Write ``checkpoint`` to ``<dirname>/<filename>`` (on the saving rank), then remove the files
        :meth:`remove` was asked to."""
        if idist.get_rank() == self.save_on_rank:
            atomic_torch_save(checkpoint, self.dirname / filename)
            for old in self._to_remove:
                if old != filename:  # ignite removes a file of the same name before replacing it
                    (self.dirname / old).unlink(missing_ok=True)
        self._to_remove.clear()

    def remove(self, filename: str) -> None:
        """Remove ``filename`` once the next file has been written (a file already gone is not an error)."""
        self._to_remove.append(filename)


def latest_training_state(save_dir: str | os.PathLike[str], prefix: str = "training_state") -> Path | None:
    """The training-state file of the highest epoch in ``save_dir`` (None if there is none).

    Args:
        save_dir: the folder :class:`TrainingStateCheckpoint` saves to.
        prefix: its file prefix.

    Example::

        latest_training_state("runs/models")  # Path("runs/models/training_state_epoch=12.pt")
    """
    folder = Path(save_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(rf"{re.escape(prefix)}_epoch=(\d+)\.pt")
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)) and p.is_file()]
    return max(found)[1] if found else None


def _epoch(engine: Engine) -> int:
    return engine.state.epoch


def _batches_per_pass(engine: Engine) -> int | None:
    try:
        return len(engine.state.dataloader)  # type: ignore[arg-type]
    except TypeError:  # an iterable without a length
        return None


class TrainingStateCheckpoint:
    """Save the whole training state atomically every ``interval`` epochs; with ``resume=True`` continue from
    the latest one.

    The state is ``save_dict`` (the model, optimizer and lr scheduler, and anything else with ``state_dict`` /
    ``load_state_dict``, e.g. a fine-tuning method's selector) plus the trainer itself (``"trainer"``: epoch,
    iteration, epoch length), under AMP its gradient scaler (``"scaler"``) and the list of files saved so far
    (``"checkpointer"``). Saving is ignite's :class:`~ignite.handlers.Checkpoint`: it writes
    ``<save_dir>/<prefix>_epoch=<N>.pt`` through :class:`AtomicDiskSaver` (an interruption leaves the previous
    complete file, never a partial one; MONAI's ``CheckpointSaver`` writes non-atomically) and removes the files
    it wrote beyond the ``n_saved`` newest, also those of the run it resumed. Saving is registered when the run
    starts, so it follows every other end-of-epoch handler attached before (the lr scheduler has stepped, the
    validation has run): the saved state is the one the next epoch starts from. The file is the usual nested
    checkpoint ``{"model": ..., "optimizer": ..., ...}``, loadable with MONAI's ``CheckpointLoader``.

    With ``resume=True`` (or ``"true"``, ``"yes"``, ``1``: a command-line ``--resume false`` means False, see
    :func:`dgst_monai.bundle.config_values.flag`), when the run starts the latest state file is loaded into the same
    objects with :class:`~dgst_monai.handlers.checkpoint_loader.SafeCheckpointLoader` (weights only, strict,
    errors naming the file); the trainer then continues with the epoch after the saved one, and ``max_epochs``
    stays the configured value (it must not be below the saved epoch). A missing state file is an error rather
    than a silent fresh start. Temporary files of saves a kill interrupted are removed, and so are state files
    the interrupted run had already replaced. Handlers attached later that also act when the run starts (e.g. a
    ``CheckpointLoader`` of pre-trained weights) run after this one: disable them when resuming. Resuming is
    meant for continuing the same run: saved objects keep their saved settings (e.g. the lr scheduler's length).

    A kill at any moment loses at most the epoch under way: the previous state file stays until the next one is
    complete (:class:`AtomicDiskSaver`). With a :class:`~dgst_monai.handlers.random_state.RandomState` in
    ``save_dict`` the random streams are restored too, and on one process with deterministic operations the
    resumed run ends with the weights of an uninterrupted one, bit for bit, provided that every epoch starts a
    new pass over the data (``epoch_length`` a multiple of the loader's length, e.g. a ``RandomSampler`` with
    ``num_samples = epoch_length * batch_size``): the position inside a pass is not saved, so otherwise a
    warning says that the resumed run will differ.

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
        ValueError: for a non-positive ``interval`` or ``n_saved``, or ``save_dict`` naming ``trainer``,
            ``scaler`` or ``checkpointer``.

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
        reserved = sorted(set(_RESERVED) & set(save_dict))
        if reserved:
            raise ValueError(f"save_dict must not use the keys {reserved}: the handler adds them itself")
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = flag(resume, "resume")
        self.interval = interval
        self.n_saved = n_saved
        self.prefix = prefix
        self.map_location = map_location
        self.logger = logging.getLogger(name)
        self._name = name
        self._saver: AtomicDiskSaver | None = None
        self._checkpoint: Checkpoint | None = None

    def attach(self, engine: Engine) -> None:
        """Register, for when the run starts: loading (if ``resume``) and saving every ``interval`` epochs.

        Args:
            engine: the trainer.
        """
        if self._name is None:
            self.logger = engine.logger
        # built on every rank: ignite's first distributed query is collective, so it must not happen on rank 0 only
        self._saver = AtomicDiskSaver(self.save_dir)
        engine.add_event_handler(Events.STARTED, self._started)

    def _started(self, engine: Engine) -> None:
        # MONAI's trainer creates its AMP scaler in run(), after attach: the saved objects are known only now
        saved_before = self._checkpoint.state_dict() if self._checkpoint is not None else None
        self._checkpoint = Checkpoint(
            to_save=self._objects(engine),
            save_handler=self._saver,
            filename_prefix=self.prefix,
            score_function=_epoch,
            score_name="epoch",
            n_saved=self.n_saved,
            filename_pattern=FILENAME_PATTERN,
            include_self=True,  # the file lists the files saved so far: a resumed run prunes them too
        )
        if saved_before is not None:  # the same trainer run again in this process
            self._checkpoint.load_state_dict(saved_before)
        if idist.get_rank() == 0:
            self._remove_interrupted_saves()
        if self.resume:
            self.load(engine)
            if idist.get_rank() == 0:
                self._remove_replaced_states()
        self._check_data_passes(engine)
        # registered now, after every handler attached before it: the state is then saved after the other
        # end-of-epoch handlers (lr scheduler step, validation) have run
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _remove_interrupted_saves(self) -> None:
        if not self.save_dir.is_dir():
            return
        for leftover in remove_interrupted_writes(self.save_dir, f"{glob.escape(self.prefix)}_epoch=*.pt"):
            self.logger.info(f"removed {leftover}, the temporary file of an interrupted save")

    def _remove_replaced_states(self) -> None:
        # a kill between writing a state and removing the one it replaced leaves both: keep what the state lists
        assert self._checkpoint is not None
        kept = {filename for _, filename in self._checkpoint.state_dict()["_saved"]}
        pattern = re.compile(rf"{re.escape(self.prefix)}_epoch=\d+\.pt")
        for path in self.save_dir.iterdir():
            if pattern.fullmatch(path.name) and path.name not in kept:
                path.unlink(missing_ok=True)
                self.logger.info(f"removed {path}, a training state the interrupted run had replaced")

    def _check_data_passes(self, engine: Engine) -> None:
        if not any(isinstance(obj, RandomState) for obj in self.save_dict.values()):
            return
        batches, length = _batches_per_pass(engine), engine.state.epoch_length
        if batches and length and length % batches:
            self.logger.warning(
                f"an epoch of {length} iterations ends inside a pass over the data ({batches} batches per pass): "
                "a run resumed from a saved epoch starts a new pass and will not continue bit for bit; make the "
                "epoch length a multiple of the batches per pass (e.g. a RandomSampler with num_samples = "
                "epoch length x batch size)"
            )

    def _objects(self, engine: Engine) -> dict[str, Any]:
        objects = dict(self.save_dict, trainer=engine)
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            objects["scaler"] = scaler
        return objects

    def load(self, engine: Engine) -> None:
        """Load the latest state file into the objects, the trainer and the list of saved files.

        Raises:
            FileNotFoundError: if ``save_dir`` has no state file.
            RuntimeError: if called before the run started.
        """
        if self._checkpoint is None:
            raise RuntimeError("TrainingStateCheckpoint.load runs when the trainer starts: attach it to the trainer")
        path = latest_training_state(self.save_dir, self.prefix)
        if path is None:
            raise FileNotFoundError(
                f"resume was requested but {self.save_dir} holds no training state ({self.prefix}_epoch=<N>.pt); "
                "run without resume to start from scratch, or point ckpt_dir at the interrupted run"
            )
        objects = dict(self._checkpoint.to_save, checkpointer=self._checkpoint)
        # weights only, strict, errors naming the file; the configured max_epochs stays
        SafeCheckpointLoader(path, objects, map_location=self.map_location, name=self.logger.name)(engine)
        self.logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    def __call__(self, engine: Engine) -> None:
        """Save the state of the epoch just completed (rank 0 writes) and remove the older state files."""
        if self._checkpoint is None:
            raise RuntimeError("TrainingStateCheckpoint must be attached to the trainer before it runs")
        self._checkpoint(engine)
        self.logger.debug(f"saved the training state of epoch {engine.state.epoch} to {self.save_dir}")
