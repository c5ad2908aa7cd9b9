"""Networks of the lymph-node foundation model: builders, the nnU-Net layout and import, adapters, checkpoints.

Importing this package registers nothing and loads no submodule: each name below imports its module on first
access (PEP 562). The fine-tuning methods know MONAI's DynUNet and SwinUNETR layouts from
:mod:`dgst_monai.roles` without any registration.

Example::

    from dgst_monai.networks import build_network, for_checkpoint

    net = build_network("dynunet", preset="cpu-small")
    net = for_checkpoint(net, "models/model.pt")   # adds the modules the fine-tuned checkpoint holds
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "NETWORKS": "factory",
    "build_network": "factory",
    "export_nnunet": "nnunet_import",
    "import_nnunet": "nnunet_import",
    "NNUNetDynUNet": "nnunet_layout",
    "DynUNetPlan": "planner",
    "ResidualEncoderDynUNet": "planner",
    "plan_dynunet": "planner",
    "plan_preset": "planner",
    "SwinUNETRPlan": "swinunetr",
    "build_swinunetr": "swinunetr",
    "swinunetr_plan": "swinunetr",
    "Adapter": "adapters",
    "inject_adapters": "adapters",
    "inject_lora": "adapters",
    "merge": "adapters",
    "MergedView": "adapters",
    "SpatialAdapter": "spatial_adapter",
    "SpatialAdapterNetwork": "spatial_adapter",
    "for_checkpoint": "checkpoints",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only
    from dgst_monai.networks.adapters import Adapter, MergedView, inject_adapters, inject_lora, merge
    from dgst_monai.networks.checkpoints import for_checkpoint
    from dgst_monai.networks.factory import NETWORKS, build_network
    from dgst_monai.networks.nnunet_import import export_nnunet, import_nnunet
    from dgst_monai.networks.nnunet_layout import NNUNetDynUNet
    from dgst_monai.networks.planner import DynUNetPlan, ResidualEncoderDynUNet, plan_dynunet, plan_preset
    from dgst_monai.networks.spatial_adapter import SpatialAdapter, SpatialAdapterNetwork
    from dgst_monai.networks.swinunetr import SwinUNETRPlan, build_swinunetr, swinunetr_plan


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
