"""Data for dgst-monai: datalists, splits, case ids, readers, and the embedded synthetic CT phantoms.

The phantom generator's names are exported here but loaded on first use, so that importing a light module
of this package (``dgst_monai.data.cases``, ``dgst_monai.data.splits``) does not load nibabel and SciPy.

Example:
    >>> from dgst_monai.data import write_synthetic_dataset  # doctest: +SKIP
    >>> datalist = write_synthetic_dataset("/tmp/ln_hn", domain="hn", n=20, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DOMAINS",
    "KERNELS",
    "LymphNode",
    "PhantomCase",
    "default_knobs",
    "resolve_knobs",
    "synthesize_case",
    "write_nifti",
    "write_synthetic_dataset",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dgst_monai.data.phantoms"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
