"""DynUNet for inference and TorchScript export, loading the deep-supervised training checkpoints strictly."""

from __future__ import annotations

import re
from typing import Any

from monai.networks.nets import DynUNet

__all__ = ["TRAINING_ONLY_KEYS", "InferenceDynUNet", "drop_deep_supervision_heads_on_load"]

#: State-dict keys (relative to the DynUNet) of the extra deep-supervision heads, which only training uses:
#: ``deep_supervision_heads.<i>.*`` and their aliases in the nested skip layers,
#: ``skip_layers.(next_layer.)*super_head.*``.
TRAINING_ONLY_KEYS = re.compile(r"(deep_supervision_heads\.|skip_layers\.(next_layer\.)*super_head\.)")


class InferenceDynUNet(DynUNet):
    """A MONAI DynUNet without deep supervision that accepts checkpoints of the same DynUNet trained with it.

    DynUNet scripts with TorchScript only when built with ``deep_supervision=False``; the training network has
    deep supervision, and its state dict holds the extra heads (``deep_supervision_heads.*``, aliased under
    ``skip_layers``) besides exactly the weights of this network. Loading such a checkpoint drops those keys
    explicitly, and only those: every other missing or unexpected key still fails a strict load. So
    ``python -m monai.bundle ckpt_export`` (which loads strictly) and MONAI's ``CheckpointLoader`` work on the
    training checkpoint unchanged, and the exported model has no unused heads. In eval mode its output equals
    the training network's.

    Args:
        *args: :class:`monai.networks.nets.DynUNet` arguments.
        **kwargs: :class:`monai.networks.nets.DynUNet` keyword arguments; ``deep_supervision`` must be absent or
            False, ``deep_supr_num`` is accepted (and ignored) so that a training config's arguments can be reused.

    Raises:
        ValueError: if ``deep_supervision=True`` is asked for.

    Example::

        train_net = DynUNet(..., deep_supervision=True, deep_supr_num=2)
        net = InferenceDynUNet(..., deep_supr_num=2)
        net.load_state_dict(train_net.state_dict())  # strict: the heads are dropped, nothing else is
        scripted = torch.jit.script(net.eval())
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("deep_supervision", False):
            raise ValueError(
                "InferenceDynUNet has no deep supervision (it is the network for inference and TorchScript export); "
                "use monai.networks.nets.DynUNet for training"
            )
        kwargs["deep_supervision"] = False
        super().__init__(*args, **kwargs)
        drop_deep_supervision_heads_on_load(self)


def drop_deep_supervision_heads_on_load(network: DynUNet) -> DynUNet:
    """Make a DynUNet built without deep supervision load checkpoints of its deep-supervised twin (strictly).

    Registers a load hook that removes exactly the training-only head keys (:data:`TRAINING_ONLY_KEYS`) from a
    state dict before ``load_state_dict``; used by :class:`InferenceDynUNet` and by other DynUNet subclasses
    built without deep supervision (e.g. the nnU-Net import's network).

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

