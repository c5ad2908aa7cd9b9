"""Test-only fault injection for bundle runs: SIGKILL the running process at an exact point, and the entry point
that runs ``python -m monai.bundle`` in a process forked from a server that has the imports done already.

A bundle run is killed from inside, deterministically: a handler in an extra config file sends SIGKILL to its
own process at the n-th occurrence of an event (mid-iteration after ``backward()``, between iterations,
during validation), or while ``torch.save`` writes a given file (after half of its bytes). SIGKILL cannot be
caught: nothing of the run's own clean-up happens, as with ``kill -9`` or the OOM killer.

Example (an extra config file)::

    {"+train#handlers": [{"_target_": "fault_injection.KillAt", "event": "BACKWARD_COMPLETED", "at": 3}]}
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

__all__ = ["KillAt", "KillDuringSave", "run_bundle_main"]


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    """SIGKILL this process at the ``at``-th ``event`` of the engine it is attached to (counted in this process).

    Args:
        event: a MONAI ``IterationEvents`` name (``BACKWARD_COMPLETED``: gradients computed, no step yet) or an
            ignite ``Events`` name (``ITERATION_COMPLETED``, ``EPOCH_COMPLETED``, ...).
        at: which occurrence.
    """

    def __init__(self, event: str, at: int = 1) -> None:
        self.event = getattr(IterationEvents, event, None) or getattr(Events, event)
        self.at = at
        self.seen = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(self.event, self)

    def __call__(self, engine: Engine) -> None:
        self.seen += 1
        if self.seen == self.at:
            _kill_self()


class KillDuringSave:
    """SIGKILL this process while ``torch.save`` writes a file whose name contains ``name``: after ``fraction``
    of its bytes have reached the file (written through the atomic writer's temporary file or in place).

    Args:
        name: part of the file name, e.g. ``"training_state_epoch=2"`` or ``"model.pt"``.
        fraction: share of the bytes written before the kill.
    """

    def __init__(self, name: str, fraction: float = 0.5) -> None:
        self.name = name
        self.fraction = fraction

    def attach(self, engine: Engine) -> None:
        original = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            target = os.fspath(f) if isinstance(f, (str, os.PathLike)) else os.readlink(f"/proc/self/fd/{f.fileno()}")
            if self.name not in Path(target).name:
                return original(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            out = open(target, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
            out.write(data[: int(len(data) * self.fraction)])
            out.flush()
            os.fsync(out.fileno())
            _kill_self()

        torch.save = save


def run_bundle_main(argv: list[str], log: str) -> None:
    """What ``python -m monai.bundle <argv>`` runs, in this (forked) process, with stdout and stderr to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)  # the same on every run: CPU results are reproducible for a fixed thread count
    sys.argv = ["monai.bundle", *argv]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
