"""Ignite handler: the final model written atomically when training completes (a bundle's ``models/model.pt``).

MONAI's ``CheckpointSaver(save_final=True)`` writes the final file in place (its disk saver is not atomic), so a
kill while it writes leaves a truncated ``model.pt``, and it also writes on an exception, so a crashed run leaves
a "final" model of a run that never finished. :class:`FinalModelSaver` writes only when the run completes,
through :func:`dgst_monai.files.atomic_torch_save` (temporary file in the same folder, flushed, fsynced,
renamed): until the new file is complete the previous one stays as it was. When a run starts, the temporary file
a killed save left is removed.

Example (a bundle's ``train#handlers``)::

    {"_target_": "dgst_monai.handlers.FinalModelSaver", "save_dir": "@ckpt_dir",
     "save_dict": {"model": "@final_model"}, "filename": "model.pt", "_disabled_": "$not @main_process"}
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from torch import nn

from dgst_monai.files import atomic_torch_save, remove_interrupted_writes

__all__ = ["FinalModelSaver"]


def _state(obj: Any) -> Any:
    if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module  # saved unwrapped: loadable without the wrapper
    return obj.state_dict()


class FinalModelSaver:
    """Save ``save_dict`` atomically to ``<save_dir>/<filename>`` when the engine completes (rank 0 only).

    The file has the layout MONAI's ``CheckpointSaver`` gives it: a single object's state dict on its own (the
    flat state dict every loader of ``model.pt`` reads), several objects as ``{key: state_dict}``. Nothing is
    written when the run fails (``Events.EXCEPTION_RAISED``) or is killed: the file is final or absent.

    Args:
        save_dir: folder of the file (created if missing).
        save_dict: ``{key: object with state_dict()}``, e.g. ``{"model": network}``.
        filename: file name.
        name: logger name; by default the engine's logger.

    Raises:
        ValueError: an empty ``save_dict`` or an object without ``state_dict``.

    Example::

        FinalModelSaver("runs/models", {"model": network}).attach(trainer)
        trainer.run()  # runs/models/model.pt holds network.state_dict()
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        save_dict: Mapping[str, Any],
        filename: str = "model.pt",
        name: str | None = None,
    ) -> None:
        if not save_dict:
            raise ValueError("FinalModelSaver needs a non-empty save_dict (the objects to save)")
        lacking = [k for k, obj in save_dict.items() if not callable(getattr(obj, "state_dict", None))]
        if lacking:
            raise ValueError(f"save_dict entries {lacking} have no state_dict()")
        self.path = Path(save_dir) / filename
        self.save_dict = dict(save_dict)
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        """Save when ``engine`` completes; remove what an interrupted save left when it starts."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self._remove_interrupted_save)
        engine.add_event_handler(Events.COMPLETED, self)

    def _remove_interrupted_save(self, engine: Engine) -> None:
        if idist.get_rank() == 0 and self.path.parent.is_dir():
            for leftover in remove_interrupted_writes(self.path.parent, glob.escape(self.path.name)):
                self.logger.info(f"removed {leftover}, the temporary file of an interrupted save")

    def __call__(self, engine: Engine) -> None:
        """Write the file (on rank 0)."""
        if idist.get_rank() != 0:
            return
        if len(self.save_dict) == 1:
            checkpoint = _state(next(iter(self.save_dict.values())))
        else:
            checkpoint = {k: _state(obj) for k, obj in self.save_dict.items()}
        atomic_torch_save(checkpoint, self.path)
        self.logger.info(f"training completed: saved the final model to {self.path}")
