"""benchmarks/gpu_check.sh on a CPU-only machine: exits 0, says it skipped the GPU parts, and its CPU side ran real
full and DGST steps (DGST's strict step changed exactly the entries its handler selected, full nearly all).

The script runs as a subprocess, the way a user runs it (``bash benchmarks/gpu_check.sh``), at the tiny size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour; this machine has CUDA")
def test_gpu_check_skips_the_gpu_parts_and_checks_the_cpu_step(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}  # the interpreter running the tests, with its packages
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--json", str(out)],
        capture_output=True, text=True, encoding="utf-8", env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SKIPPED the GPU parts: no CUDA device" in proc.stdout
    assert "CPU path:" in proc.stdout and ": OK" in proc.stdout

    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["cuda"] is False and result["ok"] is True
    assert "times" not in result and "sync" not in result  # the GPU parts really did not run
    full, dgst = result["cpu_path"]["full"], result["cpu_path"]["dgst-strict"]
    # same network, same batch, same initial weights: the same first loss
    assert full["loss"] == pytest.approx(dgst["loss"], rel=1e-6)
    # DGST strict: exactly the selected kernel entries moved, a tiny fraction of them; full moved nearly all
    assert dgst["changed_sparse"] == dgst["selected"] > 0
    assert dgst["changed_sparse"] < 0.01 * dgst["sparse_entries"]
    assert full["changed_sparse"] > 0.95 * full["sparse_entries"]
    # biases and norms are trained in both
    assert dgst["changed_other"] == full["changed_other"] > 0.9 * full["other_entries"]
