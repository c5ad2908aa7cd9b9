"""Ignite handler: load a checkpoint safely (weights only) and strictly, with errors that name the file and keys.

MONAI's ``CheckpointLoader`` already loads with ``torch.load(weights_only=True)`` and, with its default
``strict=True``, stops at keys or shapes that do not fit (torch's message lists them, but not the file). Its
``strict_shape=False`` instead *silently* skips every entry whose name or shape does not fit and then loads
nothing but the modules: a wrong checkpoint becomes a half-initialised network without a word.
:class:`SafeCheckpointLoader` is the same handler with:

- every failure naming the file: missing file, truncated or corrupt file, a file carrying pickled objects
  (refused before anything of it runs), an entry of ``load_dict`` the file lacks;
- keys or shapes that do not fit refused *before* any weight is copied, with the complete lists of the missing,
  unexpected and differently shaped entries (:class:`CheckpointMismatchError`). The check is torch's own
  ``load_state_dict`` run on a weightless (meta-device) copy of the network, so load hooks count (an adapted
  network accepts its plain foundation keys, an inference network drops deep-supervision heads);
- partial loading only when asked for (``partial=True``): the entries whose names and shapes fit are loaded and
  the skipped ones are logged.

Example::

    {"_target_": "dgst_monai.handlers.SafeCheckpointLoader",
     "load_path": "@foundation_checkpoint", "load_dict": {"model": "@network"}, "map_location": "@device"}
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from dgst_monai.files import load_torch_file

__all__ = ["CheckpointMismatchError", "SafeCheckpointLoader", "load_checkpoint"]

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose entries do not fit the object to load; the message names the file and every entry.

    Attributes:
        missing: entries the network has and the checkpoint lacks.
        unexpected: entries the checkpoint has and the network lacks.
        mismatched: ``{key: (checkpoint shape, network shape)}``.
    """

    def __init__(
        self,
        message: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or {}


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else obj


def _weightless_copy(module: nn.Module) -> nn.Module | None:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory, no data copied);
    None if the module cannot be deep-copied."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    try:
        return copy.deepcopy(module, memo)
    except Exception:  # noqa: BLE001 - an exotic module: the real load still reports problems, only later
        return None


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _for_trial(state: Mapping[str, Any], drop: Mapping[str, Any] | tuple[()] = ()) -> Mapping[str, Any]:
    """A copy of ``state`` (without ``drop``) for a trial load: torch writes ``assign`` into a state dict's
    ``_metadata`` in place, which the real load would then obey (replacing the network's parameters)."""
    copied: Any = OrderedDict((k, v) for k, v in state.items() if k not in drop)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        copied._metadata = copy.deepcopy(metadata)
    return copied


def _mismatch(module: nn.Module, state: Mapping[str, Any]) -> CheckpointMismatchError | None:
    """What torch's strict ``load_state_dict`` would refuse, found on a weightless copy (None: it fits)."""
    trial = _weightless_copy(module)
    if trial is None:
        return None
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    try:
        # assign: the checkpoint's tensors become the copy's (no copy into meta tensors, which torch warns about)
        result = trial.load_state_dict(_for_trial(state), strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches raise even when not strict; torch names each one
        mismatched = {m[1]: (_shape(m[2]), _shape(m[3])) for m in _SIZE_MISMATCH.finditer(str(err))}
        if not mismatched:
            raise
        trial = _weightless_copy(module)
        assert trial is not None  # it was copyable a moment ago
        result = trial.load_state_dict(_for_trial(state, mismatched), strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in mismatched]
    unexpected = list(result.unexpected_keys)
    if not (missing or unexpected or mismatched):
        return None
    return CheckpointMismatchError("", missing, unexpected, mismatched)


def _mismatch_message(source: str, name: str, found: CheckpointMismatchError) -> str:
    counts = f"{len(found.missing)} missing, {len(found.unexpected)} unexpected, {len(found.mismatched)} of another shape"
    lines = [f"{source} does not fit {name!r} ({counts}):"]
    if found.missing:
        lines.append("  missing from the checkpoint: " + ", ".join(found.missing))
    if found.unexpected:
        lines.append("  not in the network: " + ", ".join(found.unexpected))
    for key, (saved, wanted) in found.mismatched.items():
        lines.append(f"  other shape: {key} (checkpoint {list(saved)}, network {list(wanted)})")
    lines.append(
        "Load a checkpoint of this network (same preset, channels, classes and fine-tuning method), or ask for "
        "partial loading explicitly (partial=True) to load only the entries whose names and shapes fit."
    )
    return "\n".join(lines)


def _load_partially(module: nn.Module, state: Mapping[str, Any], source: str, name: str, logger: logging.Logger) -> None:
    own = module.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not fits:
        raise CheckpointMismatchError(
            f"{source}: no entry fits {name!r} (checkpoint keys {list(state)[:5]}..., network keys "
            f"{list(own)[:5]}...): it is not a checkpoint of this kind of network",
            missing=list(own),
            unexpected=list(state),
        )
    module.load_state_dict(fits, strict=False)
    skipped = [k for k in state if k not in fits]
    untouched = [k for k in own if k not in fits]
    logger.warning(
        f"partial load of {source} into {name!r}: {len(fits)} of {len(own)} entries loaded; skipped from the "
        f"checkpoint: {skipped or 'none'}; left as they were: {untouched or 'none'}"
    )


def load_checkpoint(
    path: str | os.PathLike[str],
    load_dict: Mapping[str, Any],
    map_location: Any = None,
    partial: bool = False,
    what: str = "checkpoint",
    logger: logging.Logger | None = None,
) -> None:
    """Load the file at ``path`` into the objects of ``load_dict`` (by key), weights only and strictly.

    The file is either ``{key: state, ...}`` or, for a single object, that object's state itself (what the
    bundles' ``FinalModelSaver`` and MONAI's ``CheckpointSaver`` write for one object). Every module is checked before anything is loaded, so a refused
    checkpoint leaves every object as it was.

    Args:
        path: the checkpoint file.
        load_dict: ``{key: object}``; modules (DataParallel / DDP unwrapped) and anything with
            ``load_state_dict`` (optimizer, scheduler, trainer, handlers).
        map_location: as for :func:`torch.load`.
        partial: load into modules only the entries whose names and shapes fit, logging the rest (every object
            must then be a module: an optimizer state would not fit a partly loaded network).
        what: what the file is, for the messages.
        logger: where partial loading reports what it skipped.

    Raises:
        FileNotFoundError: no such file.
        dgst_monai.files.UnsafeFileError: the file carries pickled objects beyond weights.
        dgst_monai.files.DamagedFileError: truncated or corrupt.
        CheckpointMismatchError: an entry of ``load_dict`` is not in the file, or a module's keys or shapes do
            not fit (without ``partial``).
        ValueError: ``partial`` with an object that is not a module.

    Example::

        load_checkpoint("models/model.pt", {"model": network}, map_location="cpu")
    """
    logger = logger or logging.getLogger(__name__)
    source = f"{what} {Path(path)}"
    if partial:
        others = [k for k, obj in load_dict.items() if not isinstance(_unwrap(obj), nn.Module)]
        if others:
            raise ValueError(f"partial loading is for networks only; {others} are not modules (load them strictly)")
    checkpoint = load_torch_file(path, what, map_location=map_location)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointMismatchError(f"{source} holds a {type(checkpoint).__name__}, not a state dict")
    (first, _), = itertools.islice(load_dict.items(), 1)
    if len(load_dict) == 1 and first not in checkpoint:
        checkpoint = {first: checkpoint}  # a single object's state saved on its own
    absent = [k for k in load_dict if k not in checkpoint]
    if absent:
        raise CheckpointMismatchError(
            f"{source} has no {absent} entry (it holds {sorted(checkpoint)}): it was written for other objects",
            missing=absent,
        )
    targets = {k: _unwrap(obj) for k, obj in load_dict.items()}
    if not partial:
        for key, obj in targets.items():
            if isinstance(obj, nn.Module) and (found := _mismatch(obj, checkpoint[key])) is not None:
                raise CheckpointMismatchError(
                    _mismatch_message(source, key, found), found.missing, found.unexpected, found.mismatched
                )
    for key, obj in targets.items():
        if isinstance(obj, nn.Module):
            if partial:
                _load_partially(obj, checkpoint[key], source, key, logger)
            else:
                obj.load_state_dict(checkpoint[key], strict=True)
        else:
            obj.load_state_dict(checkpoint[key])


class SafeCheckpointLoader:
    """Load a checkpoint when the engine starts, weights only and strictly (see the module docstring).

    A drop-in for MONAI's ``CheckpointLoader`` in bundle configs (same ``load_path``, ``load_dict``,
    ``map_location``; ``partial`` replaces ``strict_shape=False``). As with MONAI's, an engine in ``load_dict``
    gets its epoch and iteration from the file while its configured ``max_epochs`` stays.

    Args:
        load_path: the checkpoint file.
        load_dict: ``{key: object}`` to load into.
        map_location: as for :func:`torch.load`.
        partial: load only the entries that fit, logging the skipped ones (networks only).
        name: logger name; by default the engine's logger.

    Example::

        SafeCheckpointLoader("models/model.pt", {"model": network}, map_location="cpu").attach(trainer)
    """

    def __init__(
        self,
        load_path: str | os.PathLike[str],
        load_dict: Mapping[str, Any],
        map_location: Any = None,
        partial: bool = False,
        name: str | None = None,
    ) -> None:
        if not load_dict:
            raise ValueError("SafeCheckpointLoader needs a non-empty load_dict (the objects to load into)")
        self.load_path = load_path
        self.load_dict = dict(load_dict)
        self.map_location = map_location
        self.partial = partial
        self.logger = logging.getLogger(name)
        self._name = name

    def attach(self, engine: Engine) -> None:
        """Load when ``engine`` starts."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Load the checkpoint into the objects.

        Raises:
            ValueError: the file's epoch is beyond the engine's ``max_epochs``; and see :func:`load_checkpoint`.
        """
        prior_max_epochs = engine.state.max_epochs
        load_checkpoint(self.load_path, self.load_dict, self.map_location, self.partial, logger=self.logger)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.load_path} was saved at epoch {engine.state.epoch}, beyond this run's max_epochs "
                f"{prior_max_epochs}: raise max_epochs to train further"
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"loaded {sorted(self.load_dict)} from {self.load_path}")
