"""The package's folders: the bundle plumbing in dgst_monai.bundle, the phantoms in dgst_monai.data.phantoms,
their former module names still importable (the same module objects, in code, in bundle configs and under
``python -m``), and no import cycle between modules."""

from __future__ import annotations

import ast
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_support import BUNDLES
from monai.bundle import ConfigParser

import dgst_monai
from dgst_monai import MOVED_MODULES

PACKAGE = Path(dgst_monai.__file__).parent


def test_former_names_import_the_same_module_objects() -> None:
    """In a fresh interpreter, each former name imported first, then its module's own name: one module object,
    named by its own name; in this process too, where the modules are already loaded."""
    code = (
        "import importlib, json\n"
        f"moved = {MOVED_MODULES!r}\n"
        "former = {old: importlib.import_module(old) for old in moved}\n"
        "print(json.dumps({old: [former[old] is importlib.import_module(new), former[old].__name__,\n"
        "                        former[old].__spec__.name] for old, new in moved.items()}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {old: [True, new, new] for old, new in MOVED_MODULES.items()}
    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module("dgst_monai.preflight").check_data.__module__ == "dgst_monai.bundle.checks"


def test_no_file_stands_at_a_former_name() -> None:
    for old, new in MOVED_MODULES.items():
        relative = Path(*old.split(".")[1:])
        assert not (PACKAGE / relative.with_suffix(".py")).exists() and not (PACKAGE / relative).exists(), old
        module = importlib.import_module(new)
        assert Path(module.__file__).is_relative_to(PACKAGE / Path(*new.split(".")[1:-1])), new


def test_configs_naming_former_modules_still_run(tmp_path: Path) -> None:
    """A user's config written against the former names: its components, import expressions and run list."""
    from dgst_monai.bundle.record import load_training_record

    parser = ConfigParser(
        {
            "imports": ["$from dgst_monai.tracking import tracked_handlers"],
            "resume": {"_target_": "dgst_monai.config_values.flag", "value": "no", "name": "resume"},
            "folder": {"_target_": "dgst_monai.preflight.check_output_folder", "folder": str(tmp_path / "models")},
            "handlers": "$tracked_handlers([], {'method': 'dgst'})",
            "run": [
                {"_target_": "dgst_monai.export.save_training_record", "ckpt_dir": "@folder", "record": {"shots": 2}}
            ],
        }
    )
    assert parser.get_parsed_content("resume") is False
    assert parser.get_parsed_content("handlers") == []
    parser.get_parsed_content("run")
    assert load_training_record(tmp_path / "models" / "model.pt")["shots"] == 2


@pytest.mark.parametrize("module", ["dgst_monai.bundle.variants", "dgst_monai.bundle_variants"])
def test_the_variant_bundle_is_written_under_either_module_name(module: str, tmp_path: Path) -> None:
    ignore = shutil.ignore_patterns("data", "models", "eval")
    shutil.copytree(BUNDLES / "ln_ct_dynunet", tmp_path / "ln_ct_dynunet", ignore=ignore)
    command = [sys.executable, "-m", module, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'ln_ct_swinunetr'}"
    written = tmp_path / "ln_ct_swinunetr"
    committed = BUNDLES / "ln_ct_swinunetr"
    names = sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(written).as_posix() for p in written.rglob("*") if p.is_file())
    for name in names:
        assert (written / name).read_bytes() == (committed / name).read_bytes(), name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_at_import_time(tree: ast.Module) -> set[str]:
    """Modules a module's body imports when it is imported (not those of functions, nor type-checking ones)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body])
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)  # a submodule imported by name

    visit(tree.body)
    return names


def test_no_import_cycle_between_modules() -> None:
    """Following what each module imports at import time never leads back to it (normalization and data.index
    included): every module can be imported first."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        imported = _imports_at_import_time(ast.parse(path.read_text(encoding="utf-8")))
        graph[name] = sorted(i for i in imported if i in files and i != name)
    assert "dgst_monai.normalization" in graph["dgst_monai.data.index"]
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def walk(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert cycles == []
