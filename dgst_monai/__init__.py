"""dgst_monai: few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST, on MONAI.

The package imports lazily (PEP 562): ``import dgst_monai`` loads nothing but this file, and each attribute
below imports its module on first access, so ``import dgst_monai.sparsity`` or ``dgst_monai.methods`` stays
pure PyTorch (no Ignite, no MONAI, no network builder) while ``dgst_monai.FineTuningHandler`` (also
``dgst_monai.DGSTHandler``) still works in code and as a bundle config's ``_target_``.

Example::

    import dgst_monai

    net = dgst_monai.apply_method(net, "dgst")          # imports dgst_monai.methods
    handler = dgst_monai.FineTuningHandler(method="dgst")  # imports the Ignite handler

Modules that live in a sub-package keep their former names as aliases (:data:`MOVED_MODULES`):
``import dgst_monai.export`` gives the module ``dgst_monai.bundle.export`` itself, so configs and scripts that
name ``dgst_monai.preflight.check_command_line`` or run ``python -m dgst_monai.bundle_variants`` still work.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType
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

#: former module name -> the module it names (the same module object is imported under both names)
MOVED_MODULES: dict[str, str] = {
    "dgst_monai.bundle_variants": "dgst_monai.bundle.variants",
    "dgst_monai.config_values": "dgst_monai.bundle.config_values",
    "dgst_monai.export": "dgst_monai.bundle.export",
    "dgst_monai.preflight": "dgst_monai.bundle.checks",
    "dgst_monai.resources": "dgst_monai.bundle.resources",
    "dgst_monai.tracking": "dgst_monai.bundle.tracking",
    "dgst_monai.data.multisite": "dgst_monai.data.phantoms.benchmark_sets",
    "dgst_monai.data.phantom_anatomy": "dgst_monai.data.phantoms.anatomy",
    "dgst_monai.data.phantom_shapes": "dgst_monai.data.phantoms.shapes",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a name of :data:`MOVED_MODULES` as the module it names, and runs it under ``python -m``."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import machinery overwrites __spec__; exec_module restores it
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # type: ignore[union-attr]

    def get_code(self, fullname: str) -> CodeType | None:
        """The code of the module ``fullname`` names: what ``python -m <former name>`` runs (runpy asks for it)."""
        spec = importlib.util.find_spec(MOVED_MODULES[fullname])
        loader = spec.loader if spec is not None else None
        return loader.get_code(spec.name) if isinstance(loader, importlib.abc.InspectLoader) else None


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())

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
