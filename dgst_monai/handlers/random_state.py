"""The random streams a training run draws from, saved and restored with the training state.

A resumed run continues bit for bit only if it draws the same random numbers as the interrupted one would
have: the model, optimizer and scheduler states are not enough. :class:`RandomState` is a state object (it has
``state_dict`` / ``load_state_dict``) that a bundle puts into its ``training_state``, next to the model, so that
:class:`~dgst_monai.handlers.TrainingStateCheckpoint` saves and restores:

- the global generators of torch (CPU and every CUDA device), numpy and Python's ``random`` module: torch's
  decides the data loader's shuffling and, with worker processes, every worker's seed (MONAI's
  ``worker_init_fn`` seeds the transforms from it at each pass);
- the own ``numpy.random.RandomState`` of every MONAI randomizable transform of the given data pipeline (with
  ``num_workers=0`` the augmentations draw from these in the main process; MONAI's ``DataLoader`` seeds them
  once, when it is built);
- any ``torch.Generator`` of a given data loader or sampler, or passed directly.

Everything is stored as tensors, ints, floats and lists, so the state loads with ``torch.load(...,
weights_only=True)`` (and with any ``map_location``: the generator states are moved back to the CPU).

Example (a bundle's ``train.json``)::

    "training_state": {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                       "random": {"_target_": "dgst_monai.handlers.RandomState",
                                  "sources": ["@train#dataloader"]}}
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["RandomState"]

_FORMAT = 1


def _pack(state: tuple[Any, ...]) -> dict[str, Any]:
    """A numpy MT19937 state tuple (``get_state(legacy=True)``) as tensors and numbers."""
    name, keys, pos, has_gauss, cached = state
    if name != "MT19937":
        raise ValueError(f"cannot save a numpy {name} random state (only MT19937)")
    return {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _unpack(state: Mapping[str, Any]) -> tuple[Any, ...]:
    keys = np.asarray(state["keys"].cpu().numpy(), dtype=np.uint32)  # map_location may have moved it
    return ("MT19937", keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def _sharing(transforms: list[Randomizable]) -> tuple[list[np.random.RandomState], list[int]]:
    """The distinct generators of ``transforms`` and, per transform, the index of its own (transforms never
    seeded share MONAI's class-level generator)."""
    streams: list[np.random.RandomState] = []
    sharing: list[int] = []
    for t in transforms:
        index = next((i for i, s in enumerate(streams) if s is t.R), len(streams))
        if index == len(streams):
            streams.append(t.R)
        sharing.append(index)
    return streams, sharing


def _children(obj: Any) -> Iterable[Any]:
    """What of ``obj`` can hold randomizable transforms or generators (never the data themselves)."""
    if isinstance(obj, DataLoader):
        return (obj.dataset, obj.sampler, obj.batch_sampler, obj.generator)
    if isinstance(obj, Sampler):
        return (getattr(obj, "sampler", None), getattr(obj, "generator", None))
    if isinstance(obj, Dataset):
        # MONAI datasets keep their pipeline in .transform; torch's Subset / ConcatDataset wrap others
        return (getattr(obj, "transform", None), getattr(obj, "dataset", None), *getattr(obj, "datasets", ()))
    if isinstance(obj, (Transform, Randomizable)):
        # a Compose lists its transforms; a dictionary transform keeps its array transform(s) as attributes
        return [v for value in vars(obj).values() for v in (value if isinstance(value, (list, tuple)) else (value,))]
    if isinstance(obj, (list, tuple)):
        return obj
    return ()


def _walk(roots: Iterable[Any]) -> Iterator[Any]:
    """Every object reachable from ``roots`` through :func:`_children`, once each, depth first in order."""
    seen: set[int] = set()
    stack = list(reversed(list(roots)))
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        stack.extend(reversed(list(_children(obj))))


class RandomState:
    """The global random generators and those of a data pipeline, as one ``state_dict`` / ``load_state_dict``.

    The pipeline is searched when the state is saved or loaded, so ``sources`` may be built before their data
    loaders are. A state only loads into a pipeline with the same randomizable transforms in the same order
    (same classes, same count): otherwise resuming would silently draw other numbers, so it is an error.

    Under torch.distributed the saved state is rank 0's and every rank restores it: exact resumption is
    guaranteed on one process (the transforms' streams of other ranks are not saved).

    Args:
        sources: data loaders, datasets, samplers, transforms (a MONAI ``Compose``) or ``torch.Generator``s
            whose random streams belong to the run, e.g. ``[train_loader]``.
        global_streams: also save and restore the global torch (CPU and CUDA), numpy and Python generators.

    Example::

        state = RandomState([train_loader])
        saved = state.state_dict()       # at the end of an epoch
        ...
        state.load_state_dict(saved)     # when resuming: the next epoch draws the same numbers again
    """

    def __init__(self, sources: Iterable[Any] | Any = (), global_streams: bool = True) -> None:
        if isinstance(sources, (DataLoader, Dataset, Transform, Randomizable, torch.Generator)):
            sources = [sources]
        self.sources = list(sources)
        self.global_streams = bool(global_streams)

    def _pipeline(self) -> tuple[list[Randomizable], list[torch.Generator]]:
        found = list(_walk(self.sources))
        transforms = [obj for obj in found if isinstance(obj, Randomizable)]
        generators = [obj for obj in found if isinstance(obj, torch.Generator)]
        return transforms, generators

    def state_dict(self) -> dict[str, Any]:
        """The current state of every stream (tensors, ints, floats, strings and lists only)."""
        transforms, generators = self._pipeline()
        streams, sharing = _sharing(transforms)
        state: dict[str, Any] = {
            "format": _FORMAT,
            "transforms": [type(t).__name__ for t in transforms],
            "sharing": sharing,
            "transform_states": [_pack(g.get_state(legacy=True)) for g in streams],
            "generators": [g.get_state() for g in generators],
        }
        if self.global_streams:
            version, mt, gauss_next = random.getstate()
            state["python"] = {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next}
            state["numpy"] = _pack(np.random.get_state(legacy=True))
            state["torch"] = torch.get_rng_state()
            state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Set every stream to ``state`` (from :meth:`state_dict`).

        Raises:
            ValueError: ``state`` was saved for another pipeline (other randomizable transforms or generators),
                without the global streams this object restores, or in an unknown format.
        """
        if state.get("format") != _FORMAT:
            raise ValueError(f"unknown RandomState format {state.get('format')!r} (expected {_FORMAT})")
        transforms, generators = self._pipeline()
        names = [type(t).__name__ for t in transforms]
        streams, sharing = _sharing(transforms)
        if (list(state["transforms"]), list(state["sharing"])) != (names, sharing) or len(state["generators"]) != len(
            generators
        ):
            raise ValueError(
                f"the saved random state belongs to a data pipeline with the randomizable transforms "
                f"{list(state['transforms'])} and {len(state['generators'])} generator(s); this run has {names} and "
                f"{len(generators)}: resume with the data pipeline of the interrupted run"
            )
        if self.global_streams and "torch" not in state:
            raise ValueError("the saved random state lacks the global generators (saved with global_streams=False)")
        for stream, saved in zip(streams, state["transform_states"]):
            stream.set_state(_unpack(saved))
        for generator, saved in zip(generators, state["generators"]):
            generator.set_state(saved.cpu())
        if self.global_streams:
            py = state["python"]
            random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
            np.random.set_state(_unpack(state["numpy"]))
            torch.set_rng_state(state["torch"].cpu())
            cuda = [t.cpu() for t in state["cuda"]]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
