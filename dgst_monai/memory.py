"""This process's resident memory (RSS) and its peak, measured so that a child process reports its own peak; the
CPU model that measurements record beside them (floating-point results of the same run differ across CPU models).

The protocol's cells and the benchmarks' workers each run in a process of their own, started by a larger parent
(the runner, the benchmark driver) with ``subprocess``, i.e. fork or vfork, then ``exec``. Linux keeps two
high-water marks, and only one of them belongs to the child:

- ``getrusage(RUSAGE_SELF).ru_maxrss`` survives ``exec``: the kernel folds the parent's high-water mark at the
  fork into the child's, so a cell that peaks at 300 MiB under a runner that peaked at 2 GiB reports 2 GiB.
- ``VmHWM`` in ``/proc/self/status`` is the high-water mark of the process's current address space, which
  ``exec`` replaces: it starts at the child's own RSS. It can also be lowered to the current RSS (``5`` written
  to ``/proc/self/clear_refs``, Linux >= 4.0), so that a measurement leaves out the peak of its own set-up
  (imports, building a network), which can exceed a small network's training peak.

:func:`peak_rss_mb` reads ``VmHWM`` and falls back on ``ru_maxrss`` only where there is no ``/proc`` (macOS),
where the inherited mark is the best there is. Sizes are MiB (2**20 bytes).

Example::

    from dgst_monai.memory import peak_rss_mb, reset_peak_rss, rss_mb

    reset_peak_rss()                      # forget the peak of the imports and the set-up
    before = rss_mb()
    train()
    growth = peak_rss_mb() - before       # what training itself added at its peak
"""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_mb", "reset_peak_rss", "rss_mb"]

_STATUS = "/proc/self/status"


def _status_mb(key: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` in MiB; ``OSError`` where procfs lacks it."""
    with open(_STATUS, encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"no {key} in {_STATUS}")


def rss_mb() -> float:
    """This process's resident memory now (``VmRSS``), in MiB.

    Raises:
        OSError: where there is no ``/proc/self/status`` (not Linux).
    """
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MiB: since it started (or since :func:`reset_peak_rss`).

    ``VmHWM``, which belongs to this process alone even when a larger parent started it (see the module
    docstring). Without ``/proc``, ``ru_maxrss``, which may include the parent's peak.
    """
    try:
        return _status_mb("VmHWM")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is bytes on macOS, KiB elsewhere
        return peak / 1024.0**2 if sys.platform == "darwin" else peak / 1024.0


def reset_peak_rss() -> bool:
    """Lower this process's peak RSS to its current RSS, so that :func:`peak_rss_mb` measures from here.

    Returns:
        Whether the peak was reset (``False`` without a writable ``/proc/self/clear_refs``: the peak then still
        includes everything before this call).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; :func:`platform.processor` where there is none)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
