"""Rebuild in a plain network the modules a fine-tuned checkpoint adds, so that it loads strictly.

A fine-tuned checkpoint (``models/model.pt``, written by the bundle's ``FinalModelSaver`` through
:class:`~dgst_monai.networks.adapters.MergedView`) says by its keys which modules it adds to the foundation
network: ``<block>.conv2.adapter.*`` for Houlsby adapters (``adapter``), ``foundation.*`` +
``spatial_adapter.*`` for the black-box spatial adapter (``spatial_adapter``). LoRA is folded in before saving,
so a LoRA checkpoint is plain. :func:`for_checkpoint` reads those keys and returns the network the checkpoint
belongs to, built around the plain one; a plain checkpoint gives the plain network back unchanged. In a
bundle's evaluate / inference config this is one component:

``"network": {"_target_": "dgst_monai.networks.for_checkpoint", "network": "@network_def", "checkpoint":
"@checkpoint", "device": "@device"}``

after which MONAI's ``CheckpointLoader`` (strict) and ``python -m monai.bundle ckpt_export network ...`` work
on any fine-tuned checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dgst_monai.files import load_torch_file
from dgst_monai.networks.adapters import injected_kind, rebuild_adapters
from dgst_monai.networks.spatial_adapter import FOUNDATION, spatial_adapter_for_state

__all__ = ["checkpoint_state", "for_checkpoint"]

Checkpoint = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def checkpoint_state(checkpoint: Checkpoint) -> Mapping[str, torch.Tensor]:
    """The model state dict of a checkpoint file or mapping: the mapping itself when flat (what MONAI's
    ``CheckpointSaver`` writes for a single object), else its ``"model"`` entry (a training-state checkpoint).

    Files are memory-mapped (``torch.load(..., weights_only=True, mmap=True)``), so reading the keys and shapes
    costs no copy of the weights.

    Raises:
        FileNotFoundError: ``checkpoint`` is a path that does not exist.
        dgst_monai.files.UnsafeFileError: the file carries pickled objects beyond weights (refused unread).
        dgst_monai.files.DamagedFileError: truncated or corrupt.
        ValueError: neither a flat state dict nor one with a ``"model"`` state dict.

    Example::

        keys = list(checkpoint_state("models/model.pt"))
    """
    source = "the given state dict"
    if not isinstance(checkpoint, Mapping):
        source = str(checkpoint)
        checkpoint = load_torch_file(checkpoint, "checkpoint", map_location="cpu", mmap=True)
    if isinstance(checkpoint, Mapping) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    model = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        return model
    raise ValueError(f"{source} is not a model state dict (nor a checkpoint with one under 'model')")


def for_checkpoint(
    network: nn.Module, checkpoint: Checkpoint | None, device: torch.device | str | None = None
) -> nn.Module:
    """``network`` with the modules ``checkpoint`` adds, ready for ``load_state_dict(checkpoint)`` (strict).

    Houlsby adapters are added in place where the checkpoint's keys put them
    (:func:`~dgst_monai.networks.adapters.rebuild_adapters`); a spatial-adapter checkpoint returns a
    :class:`~dgst_monai.networks.spatial_adapter.SpatialAdapterNetwork` around ``network`` (with adapters
    rebuilt inside it if it holds any). A plain checkpoint, or a path that does not exist yet (a config parsed
    before training, the model zoo's checks), returns ``network`` unchanged; the loader then reports a missing
    file itself. Nothing is loaded here: the weights are loaded by the caller (``CheckpointLoader``,
    ``ckpt_export``).

    Args:
        network: a freshly built plain network: the foundation definition the checkpoint was fine-tuned from
            (with or without deep supervision).
        checkpoint: path of the fine-tuned checkpoint (or its state dict); None returns ``network``.
        device: where to move the result; the added modules are built beside ``network``'s first, so they move
            with it. None leaves it where it is.

    Returns:
        The network to load the checkpoint into.

    Raises:
        ValueError: an unmerged LoRA checkpoint (save it through ``MergedView``), or adapter keys that do not
            fit ``network``.

    Example::

        net = for_checkpoint(build_network("dynunet", deep_supervision=False), "tuned/model.pt")
        net.load_state_dict(checkpoint_state("tuned/model.pt"))
    """
    built = _with_checkpoint_modules(network, checkpoint)
    return built if device is None else built.to(device)


def _with_checkpoint_modules(network: nn.Module, checkpoint: Checkpoint | None) -> nn.Module:
    if checkpoint is None or (not isinstance(checkpoint, Mapping) and not Path(checkpoint).is_file()):
        return network
    state = checkpoint_state(checkpoint)
    where = "the given state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    lora = [k for k in state if injected_kind(k) == "lora"]
    if lora:
        raise ValueError(
            f"{where} holds unmerged LoRA weights ({lora[0]}, ...): save the fine-tuned network through "
            "dgst_monai.networks.MergedView (LoRA folds into the plain network)"
        )
    wrapped = spatial_adapter_for_state(network, state)
    if wrapped is network:
        return rebuild_adapters(network, state)
    prefix = f"{FOUNDATION}."
    rebuild_adapters(network, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return wrapped
