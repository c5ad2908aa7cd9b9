"""The package as users install it: the wheel, in a fresh virtual environment with no checkout on the path.

The fresh environment reuses this one's dependencies (torch, MONAI, ...) through a ``.pth`` file naming this
environment's ``site-packages``; a ``.pth`` line is only a path, so this environment's own ``.pth`` files, among
them the editable install's finder, are not run there, and ``dgst_monai`` comes from the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

REPO = REPO

pytestmark = pytest.mark.slow  # the demo in the fresh environment takes about a minute


def _source_files() -> list[str]:
    """The checkout's files as a clone has them: tracked or new, not git-ignored (no build/, no run outputs)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", check=True,
    )  # fmt: skip
    return sorted(f for f in listed.stdout.split("\0") if f and (REPO / f).is_file())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the checkout (setuptools builds in the source tree, and stale files
    in an old ``build/`` would end up in the wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    subprocess.run([*command, str(source)], capture_output=True, text=True, encoding="utf-8", errors="replace", check=True, timeout=300)
    (path,) = out.glob("dgst_monai-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the wheel installed and this environment's packages on its path."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", check=True,
    ).stdout.strip()  # fmt: skip
    # this interpreter's package folders (not the checkout, nor pytest's additions to sys.path)
    ours = [p for p in dict.fromkeys(sys.path) if Path(p).name in ("site-packages", "dist-packages")]
    Path(own, "_dependencies.pth").write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, capture_output=True, text=True, encoding="utf-8", errors="replace", check=True, timeout=300)
    return root


def _run(venv: Path, cwd: Path, *command: str, timeout: float = 120) -> str:
    """A command of the fresh environment, from ``cwd``, with nothing of this session on its Python path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-4000:]}"
    return done.stdout


def test_wheel_holds_every_module_and_shipped_file_and_no_run_output(wheel):
    """The wheel holds every module of dgst_monai/ and every file of bundles/ and data_manifests/ (as
    dgst_monai/bundles/..., dgst_monai/data_manifests/...), and nothing else but its metadata."""
    names = {n for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    expected = set()
    for name in _source_files():
        top, _, rest = name.partition("/")
        if top == "dgst_monai" and name.endswith(".py"):
            expected.add(name)
        elif top in ("bundles", "data_manifests"):
            expected.add(f"dgst_monai/{top}/{rest}")
    assert sorted(expected - names) == [], "missing from the wheel: a new subpackage or bundle folder? (pyproject)"
    assert sorted(names - expected) == []


def test_installed_package_runs_demo_and_cards_outside_the_checkout(venv, tmp_path):
    """``dgst-monai data cards`` and ``dgst-monai demo --size tiny`` from an empty folder: the package, its
    bundles and cards come from the fresh environment, and the demo writes nothing into the installed bundle."""
    script = "import dgst_monai.bundle.resources as r; print(r.__file__, r.shipped_dir('bundles'))"
    module, bundles = (Path(p) for p in _run(venv, tmp_path, "python", "-c", script).split())
    assert module.is_relative_to(venv) and bundles.is_relative_to(venv)
    installed = {p: p.stat().st_mtime_ns for p in bundles.rglob("*") if "__pycache__" not in p.parts}

    cards = _run(venv, tmp_path, "dgst-monai", "data", "cards").splitlines()
    titles = {p.stem: json.loads(p.read_text(encoding="utf-8"))["title"] for p in (REPO / "data_manifests").glob("*.json")}
    assert [line.split(maxsplit=1) for line in cards] == [[name, titles[name]] for name in sorted(titles)]

    _run(venv, tmp_path, "dgst-monai", "demo", "--size", "tiny", "--shots", "2", "--output", "demo", timeout=900)
    rows = json.loads((tmp_path / "demo" / "results.json").read_text(encoding="utf-8"))["target"]
    assert list(rows) == ["foundation (no fine-tuning)", "full (2-shot)", "dgst (2-shot)"]
    assert all(0.0 <= row["dice"]["mean"] <= 1.0 for row in rows.values())
    assert {p: p.stat().st_mtime_ns for p in bundles.rglob("*") if "__pycache__" not in p.parts} == installed
