"""dgst_monai: few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST, on MONAI.

The package imports lazily (PEP 562): ``import dgst_monai`` loads nothing but this file, and each attribute
below imports its module on first access, so ``import dgst_monai.sparsity`` or ``dgst_monai.methods`` stays
pure PyTorch (no Ignite, no MONAI, no network builder) while ``dgst_monai.FineTuningHandler`` (also
``dgst_monai.DGSTHandler``) still works in code and as a bundle config's ``_target_``.

Example::

    import dgst_monai

    net = dgst_monai.apply_method(net, "dgst")          # imports dgst_monai.methods
    handler = dgst_monai.FineTuningHandler(method="dgst")  # imports the Ignite handler
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public attribute -> module that defines it
_ATTRIBUTES: dict[str, str] = {
    "DGSTHandler": "dgst_monai.handlers.fine_tuning",
    "FineTuningHandler": "dgst_monai.handlers.fine_tuning",
    "FineTuningMethod": "dgst_monai.methods",
    "METHODS": "dgst_monai.methods",
    "SelectionOptions": "dgst_monai.methods",
    "apply_method": "dgst_monai.methods",
    "get_method": "dgst_monai.methods",
    "register_method": "dgst_monai.methods",
    "describe_parameters": "dgst_monai.roles",
    "register_head_type": "dgst_monai.roles",
    "register_network": "dgst_monai.roles",
    "SparseUpdate": "dgst_monai.sparsity",
    "select_dgst": "dgst_monai.sparsity",
}
#: subpackages reachable as attributes without an explicit import (``dgst_monai.networks.build_network``)
_SUBPACKAGES = ("networks", "handlers", "data")

__all__ = sorted([*_ATTRIBUTES, "networks"])

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time everything is resolved by __getattr__
    from dgst_monai import networks
    from dgst_monai.handlers.fine_tuning import DGSTHandler, FineTuningHandler
    from dgst_monai.methods import (
        METHODS,
        FineTuningMethod,
        SelectionOptions,
        apply_method,
        get_method,
        register_method,
    )
    from dgst_monai.roles import describe_parameters, register_head_type, register_network
    from dgst_monai.sparsity import SparseUpdate, select_dgst


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_ATTRIBUTES, *_SUBPACKAGES})
