"""Build any network of the model zoo by name: dynunet, dynunet_resenc, swinunetr, swinunetr_v2, nnunet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dgst_monai.networks.planner import DynUNetPlan, plan_preset
from dgst_monai.networks.swinunetr import build_swinunetr

__all__ = ["NETWORKS", "build_network"]


def _dynunet(
    *,
    residual: bool,
    preset: str = "cpu-small",
    plan: DynUNetPlan | None = None,
    in_channels: int = 1,
    out_channels: int = 2,
    deep_supervision: bool = True,
    **planner_kwargs: Any,
) -> nn.Module:
    if plan is not None and planner_kwargs:
        raise ValueError(f"give either a plan or planner arguments, not both: {sorted(planner_kwargs)}")
    if plan is None:
        plan = plan_preset(preset, **{"residual": residual, **planner_kwargs})
    return plan.network(in_channels, out_channels, deep_supervision=deep_supervision, residual=residual)


def _nnunet(**kwargs: Any) -> nn.Module:
    from dgst_monai.networks.nnunet_import import import_nnunet  # torch.load machinery, only when asked

    return import_nnunet(**kwargs)


#: name -> builder; every builder takes keyword arguments only.
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "dynunet": lambda **kw: _dynunet(residual=False, **kw),
    "dynunet_resenc": lambda **kw: _dynunet(residual=True, **kw),
    "swinunetr": lambda **kw: build_swinunetr("v1", **kw),
    "swinunetr_v2": lambda **kw: build_swinunetr("v2", **kw),
    "nnunet": _nnunet,
}


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a network of the model zoo by name.

    Args:
        name: ``dynunet`` (nnU-Net-planned DynUNet), ``dynunet_resenc`` (its residual-encoder variant),
            ``swinunetr``, ``swinunetr_v2`` or ``nnunet`` (a trained nnU-Net v2 model folder, imported).
        **kwargs: the builder's arguments:
            dynunet / dynunet_resenc: ``preset`` (default ``"cpu-small"``) or ``plan`` (a
            :class:`~dgst_monai.networks.planner.DynUNetPlan`), ``in_channels``, ``out_channels``,
            ``deep_supervision``, and any :func:`~dgst_monai.networks.planner.plan_dynunet` argument
            overriding the preset's (``spacing``, ``patch_size``, ``base_filters``, ...);
            swinunetr / swinunetr_v2: :func:`~dgst_monai.networks.swinunetr.build_swinunetr`'s;
            nnunet: :func:`~dgst_monai.networks.nnunet_import.import_nnunet`'s (``model_folder``, ``fold``, ...).

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example::

        net = build_network("dynunet", preset="paper")
        swin = build_network("swinunetr_v2", feature_size=48)
        # in a bundle: "network_def": {"_target_": "dgst_monai.networks.build_network", "name": "swinunetr"}
    """
    try:
        builder = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}") from None
    return builder(**kwargs)
