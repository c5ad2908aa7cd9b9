"""Ignite handlers for MONAI engines: fine-tuning (DGST and the other methods), training state, metrics, reports.

Configs name them as ``dgst_monai.handlers.<Class>``, e.g. ``{"_target_": "dgst_monai.handlers.EvaluationReport",
"output_dir": "eval", "metric_names": ["dice", "nsd_1mm"]}``.
"""

from __future__ import annotations

from dgst_monai.handlers.checkpoint_loader import CheckpointMismatchError, SafeCheckpointLoader
from dgst_monai.handlers.evaluation_report import EvaluationReport
from dgst_monai.handlers.final_checkpoint import FinalModelSaver
from dgst_monai.handlers.fine_tuning import DGSTHandler, FineTuningHandler
from dgst_monai.handlers.random_state import RandomState
from dgst_monai.handlers.size_prior import SizePriorHandler, support_fraction
from dgst_monai.handlers.surface_dice import SurfaceDiceHandler
from dgst_monai.handlers.training_state import AtomicDiskSaver, TrainingStateCheckpoint, latest_training_state

__all__ = [
    "AtomicDiskSaver",
    "CheckpointMismatchError",
    "DGSTHandler",
    "EvaluationReport",
    "FinalModelSaver",
    "FineTuningHandler",
    "RandomState",
    "SafeCheckpointLoader",
    "SizePriorHandler",
    "SurfaceDiceHandler",
    "TrainingStateCheckpoint",
    "latest_training_state",
    "support_fraction",
]
