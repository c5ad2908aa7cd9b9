"""Inference and TorchScript networks without deep supervision that load deep-supervised checkpoints strictly."""

from __future__ import annotations

import re
from typing import Any

from monai.networks.nets import DynUNet

__all__ = ["TRAINING_ONLY_KEYS", "drop_deep_supervision_heads_on_load"]

#: State-dict keys (relative to the DynUNet) of the extra deep-supervision heads, which only training uses:
#: ``deep_supervision_heads.<i>.*`` and their aliases in the nested skip layers,
#: ``skip_layers.(next_layer.)*super_head.*``.
TRAINING_ONLY_KEYS = re.compile(r"(deep_supervision_heads\.|skip_layers\.(next_layer\.)*super_head\.)")


def drop_deep_supervision_heads_on_load(network: DynUNet) -> DynUNet:
    """Make a DynUNet built without deep supervision load checkpoints of its deep-supervised twin (strictly).

    Registers a load hook that removes exactly the training-only head keys (:data:`TRAINING_ONLY_KEYS`) from a
    state dict before ``load_state_dict``; used by :class:`~dgst_monai.networks.nnunet_layout.NNUNetDynUNet`
    built without deep supervision (the bundles' inference network).

    Args:
        network: a DynUNet (or subclass) with ``deep_supervision=False``.

    Returns:
        ``network``, modified in place.

    Raises:
        ValueError: if ``network`` has deep supervision (its heads must then load).
    """
    if getattr(network, "deep_supervision", False):
        raise ValueError("the network has deep supervision: its heads are part of its state and must load")
    network._register_load_state_dict_pre_hook(_drop_deep_supervision_heads)
    return network


def _drop_deep_supervision_heads(
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load hook: remove the training-only deep-supervision heads of this module from ``state_dict``."""
    for key in [k for k in state_dict if k.startswith(prefix) and TRAINING_ONLY_KEYS.match(k, len(prefix))]:
        del state_dict[key]

