"""Data for dgst-monai: the embedded synthetic CT phantoms (and, beside them, manifests of the real cohorts)."""

from __future__ import annotations

from dgst_monai.data.phantoms import (
    DOMAINS,
    KERNELS,
    LymphNode,
    PhantomCase,
    default_knobs,
    resolve_knobs,
    synthesize_case,
    write_nifti,
    write_synthetic_dataset,
)

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
