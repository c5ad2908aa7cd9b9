"""The paper's protocol as one command: methods x shots x seeds, DSC / NSD / lymph-node detection, report.

``dgst-monai benchmark`` (:func:`run_benchmark`) runs every cell of a grid through the bundle's finetune and
evaluate configs, resumably, one cell after another or as a Slurm job array (submitit);
``dgst-monai benchmark report DIR`` (:func:`write_report`) merges the finished cells into CSV tables,
``report.md`` (the paper's layout), plots and a qualitative figure.

Modules: :mod:`~dgst_monai.protocol.grid` (the cells), :mod:`~dgst_monai.protocol.cell` (one cell's run),
:mod:`~dgst_monai.protocol.handlers` (the handlers a cell adds to the bundle), :mod:`~dgst_monai.protocol.executors`
(local / submitit), :mod:`~dgst_monai.protocol.runner`, :mod:`~dgst_monai.protocol.report`,
:mod:`~dgst_monai.protocol.plots`, :mod:`~dgst_monai.protocol.figure`, :mod:`~dgst_monai.protocol.commands`
(the command line). The two functions below import their modules on first use (PEP 562), so that the command
line's ``--help`` stays fast.

Example::

    from dgst_monai.protocol import run_benchmark, write_report

    run_benchmark("runs/bench", shots=[5, 10, 20], methods=["full", "bias", "dgst"], preset="cpu-small")
    write_report("runs/bench")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["run_benchmark", "write_report"]

_ATTRIBUTES = {"run_benchmark": "dgst_monai.protocol.runner", "write_report": "dgst_monai.protocol.report"}

if TYPE_CHECKING:
    from dgst_monai.protocol.report import write_report
    from dgst_monai.protocol.runner import run_benchmark


def __getattr__(name: str) -> Any:
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
