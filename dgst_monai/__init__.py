"""dgst_monai: few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST, on MONAI."""

from __future__ import annotations

from dgst_monai import networks  # registers the MONAI networks' layouts and heads
from dgst_monai.handlers.dgst_handler import DGSTHandler
from dgst_monai.methods import METHODS, FineTuningMethod, SelectionOptions, apply_method, get_method
from dgst_monai.roles import describe_parameters, register_head_type, register_network
from dgst_monai.sparsity import SparseUpdate, select_dgst

__version__ = "0.1.0"

__all__ = [
    "DGSTHandler",
    "FineTuningMethod",
    "METHODS",
    "SelectionOptions",
    "SparseUpdate",
    "apply_method",
    "describe_parameters",
    "get_method",
    "networks",
    "register_head_type",
    "register_network",
    "select_dgst",
]
