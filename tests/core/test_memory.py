"""dgst_monai.memory: a child process's peak RSS is its own, not its parent's, and the peak can be reset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dgst_monai.memory import peak_rss_mb, rss_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")

PARENT_MB, CHILD_MB = 900, 300

# Runs in a fresh interpreter: allocates (and touches) CHILD_MB, then prints its peaks as one JSON line.
CHILD = f"""
import json, resource
from dgst_monai.memory import peak_rss_mb, reset_peak_rss, rss_mb
before = peak_rss_mb()
block = b"\\x01" * ({CHILD_MB} << 20)
peak = peak_rss_mb()
inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
del block
reset = reset_peak_rss()
print(json.dumps(dict(before=before, peak=peak, inherited=inherited, reset=reset, after_reset=peak_rss_mb(),
                      rss=rss_mb())))
"""


def _child() -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_child_reports_its_own_peak_not_the_parents():
    """A child started while its parent holds 900 MiB allocates 300 MiB: its peak is its own ~300 MiB.

    ``ru_maxrss`` in the same child carries the parent's high-water mark, which is what the helper avoids.
    """
    held = b"\x01" * (PARENT_MB << 20)  # resident while the child starts: the parent peaks higher than the child
    assert peak_rss_mb() >= rss_mb() >= PARENT_MB
    child = _child()
    del held

    assert child["inherited"] >= PARENT_MB  # the trap is real: getrusage reports the parent's mark
    assert CHILD_MB * 0.95 <= child["peak"] - child["before"] <= CHILD_MB * 1.1  # its own allocation
    assert child["peak"] < PARENT_MB - 200  # and not the parent's
    assert child["before"] < 200  # an interpreter and a stdlib-only module, nothing of the parent's


def test_reset_lowers_the_peak_to_the_current_rss():
    """After the 300 MiB block is freed, reset_peak_rss brings the peak back down to the process's RSS."""
    child = _child()
    assert child["reset"] is True
    assert child["after_reset"] <= child["rss"] + 5  # measured from the reset on
    assert child["after_reset"] < child["peak"] - CHILD_MB * 0.9


def test_cpu_model_is_the_model_name_of_proc_cpuinfo():
    """The CPU model recorded beside measurements is /proc/cpuinfo's first ``model name``."""
    from dgst_monai.memory import cpu_model

    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    assert names and cpu_model() == names[0]
