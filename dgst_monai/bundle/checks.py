"""Checks a bundle run makes in ``initialize``, before any long work.

They refuse overrides that name nothing, an output folder that cannot be written or is full, and a datalist that
fails ``dgst-monai data check`` or has more classes than the network.

``python -m monai.bundle run`` accepts any ``--key value``: a misspelt ``--methd dgst`` adds an unused key and the
run goes on with the default method to the end. :func:`check_command_line` reads the overrides that the running
``python -m monai.bundle run`` was given (:func:`bundle_run_arguments`) and stops at one that neither names a key of
the configs, nor a key they refer to (``@key``), nor a new argument of one of their components (checked against the
component's signature). Each check prints one message saying what to do and exits with status 2 (a bundle's
``initialize`` list calls them)::

    "initialize": [{"_target_": "dgst_monai.bundle.checks.check_command_line"},
                   {"_target_": "dgst_monai.bundle.checks.check_output_folder", "folder": "@ckpt_dir"},
                   {"_target_": "dgst_monai.bundle.checks.check_data", "datalist": "@datalist",
                    "out_channels": "@out_channels", "in_channels": "@in_channels"},
                   {"_target_": "monai.utils.set_determinism", "seed": "@seed"}]

Example:
    >>> from dgst_monai.bundle.checks import unknown_overrides
    >>> unknown_overrides(["bundles/ln_ct_dynunet/configs/train.json"], ["methd", "max_epochs"])  # doctest: +SKIP
    ["--methd: no such key (did you mean --method?)"]
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["bundle_run_arguments", "check_command_line", "check_output_folder", "check_data", "unknown_overrides"]

_REFERENCE = re.compile(r"@([A-Za-z_][\w#:]*)")


def _fail(message: str) -> NoReturn:
    # SystemExit, not an exception: MONAI would wrap an exception of an expression in a long traceback
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _monai_run_arguments() -> set[str]:
    """What ``monai.bundle run`` takes itself (not config overrides)."""
    from monai.bundle import ConfigWorkflow, scripts
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    names = set()
    for function in (scripts.run, scripts.create_workflow, ConfigWorkflow.__init__):
        names |= set(inspect.signature(function).parameters)
    names |= set(DEFAULT_MLFLOW_SETTINGS["configs"])  # keys of --tracking mlflow
    return names - {"self", "override", "kwargs"}


def _accepts(component: dict[str, Any], argument: str) -> bool:
    """Whether the ``_target_`` of a config component takes ``argument`` (True when it cannot be told)."""
    from monai.bundle.config_item import ComponentLocator
    from monai.utils.module import locate

    target = component.get("_target_")
    if not isinstance(target, str) or target.startswith("$"):
        return True
    module = ComponentLocator().get_component_module_name(target)
    module = module[0] if isinstance(module, list) else module
    try:
        obj = locate(f"{module}.{target}" if module else target)
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError, AttributeError, ImportError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == argument for p in parameters)


def unknown_overrides(config_files: Sequence[str | os.PathLike[str]], keys: Iterable[str]) -> list[str]:
    """The override keys (``--key`` without dashes) that would change nothing in the merged ``config_files``.

    A key is known when the configs define it (``train#handlers#0#resume`` too), refer to it (``@probe_file``),
    or it is a new argument of a component whose ``_target_`` takes it (``dgst_handler#warmup_steps``).

    Returns:
        One message per unknown key, with the closest known keys as suggestions.

    Example::

        unknown_overrides(["configs/train.json", "configs/finetune.json"], ["methd"])
        # ["--methd: no such key (did you mean --method?)"]
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    content = parser.get()
    referenced = {ref.replace("::", "#") for ref in _REFERENCE.findall(json.dumps(content))}
    problems = []
    for raw in keys:
        key = raw.removeprefix("+").replace("::", "#")
        if key in parser or key in referenced:
            continue
        parent, _, name = key.rpartition("#")
        if parent and parent in parser and isinstance(parser[parent], dict) and _accepts(parser[parent], name):
            continue
        siblings = list(parser[parent]) if parent and parent in parser and isinstance(parser[parent], dict) else []
        if siblings:  # compare the last part only: the shared parent would make every sibling look close
            close = [f"{parent}#{c}" for c in difflib.get_close_matches(name, siblings, n=2, cutoff=0.8)]
        else:
            close = difflib.get_close_matches(key, list(dict.fromkeys([*content, *referenced])), n=2, cutoff=0.8)
        hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
        where = f"{parent!r} takes no argument {name!r}" if siblings else "no such key"
        problems.append(f"--{raw}: {where}{hint}")
    return problems


def _config_files(value: Any) -> list[str]:
    """``config_file`` of a ``run`` call as a list: a list of paths, or one path, or paths joined by commas (which
    MONAI splits unless the whole string names a file)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value)
    return text.split(",") if "," in text and not Path(text).is_file() else [text]


def bundle_run_arguments() -> dict[str, Any] | None:
    """The arguments of the ``python -m monai.bundle run`` command that this code runs under, or None.

    The command is recognised by what runs, not by how the program was named: the process's ``__main__`` is the
    module ``monai.bundle.__main__`` (also under ``torchrun -m monai.bundle``), and ``monai.bundle.scripts.run``
    is on the call stack, as it is while it creates and initialises the workflow (the bundle's ``initialize``
    list runs then). Its frame holds what the command was given, as fire parsed it: ``config_file``,
    ``args_file``, ``meta_file``, ... and the overrides. A workflow made by other code (``dgst-monai predict``,
    MONAI Label, the demo's and the benchmark's ``monai.bundle.run`` calls, the tests) gets None.

    Returns:
        The run's own arguments that were given (not None) and its overrides, in one dict.
    """
    from monai.bundle import scripts

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) != "monai.bundle.__main__":
        return None
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not scripts.run.__code__:
        frame = frame.f_back
    if frame is None:
        return None
    values = frame.f_locals
    own = {k: v for k, v in values.items() if k in inspect.signature(scripts.run).parameters and k != "override"}
    return {**{k: v for k, v in own.items() if v is not None}, **values.get("override", {})}


def check_command_line(arguments: Mapping[str, Any] | None = None) -> None:
    """Stop a ``python -m monai.bundle run`` whose overrides name keys the configs do not have.

    Does nothing outside that command (a workflow made by other code, such as ``dgst-monai predict`` or MONAI
    Label, whose overrides are its own): see :func:`bundle_run_arguments`.

    Args:
        arguments: the command's arguments and overrides (``{"config_file": [...], "method": "dgst"}``); default
            those of the ``python -m monai.bundle run`` this is called under (:func:`bundle_run_arguments`).

    Raises:
        SystemExit: status 2, after printing every unknown override with suggestions.
    """
    arguments = bundle_run_arguments() if arguments is None else dict(arguments)
    if arguments is None:
        return
    if arguments.get("args_file"):  # MONAI reads further arguments and overrides from this file; given ones win
        from monai.bundle import ConfigParser

        arguments = {**ConfigParser.load_config_file(str(arguments["args_file"])), **arguments}
    own = _monai_run_arguments()
    overrides = [str(k) for k in arguments if k not in own]
    if arguments.get("config_file") is None or not overrides:
        return
    problems = unknown_overrides(_config_files(arguments["config_file"]), overrides)
    if problems:
        _fail(
            "the command line overrides keys the bundle does not have, so they would change nothing:\n  "
            + "\n  ".join(problems)
            + "\nCorrect the spelling (keys are case-sensitive; nested keys are written a#b#c)."
        )


def check_output_folder(folder: str | os.PathLike[str], min_free_gb: float = 1.0) -> str:
    """Create ``folder`` if needed and check that a file can be written there and that it has room.

    Args:
        folder: where the run writes (checkpoints, training states).
        min_free_gb: free space required.

    Returns:
        The folder, for use in a config expression.

    Raises:
        SystemExit: status 2, with what to do.
    """
    path = Path(folder)
    probe = path / f".write_test_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        _fail(f"cannot write to the output folder {path} ({err.strerror or err}); pass a writable --ckpt_dir")
    free = shutil.disk_usage(path).free / 1e9
    if free < min_free_gb:
        _fail(f"only {free:.2f} GB free in {path}, at least {min_free_gb:g} GB needed; free space or pass --ckpt_dir on another disk")
    return str(path)


def check_data(
    datalist: str | os.PathLike[str], out_channels: int, in_channels: int = 1, split: str = "training"
) -> str:
    """Check a datalist before a bundle run: ``dgst-monai data check --quick`` (entries, files, headers, geometry,
    file integrity), label classes that fit the network's ``out_channels`` and images that fit its
    ``in_channels`` (the data check admits single-channel 3-D volumes only, one image per case); ``split`` is
    the list the run reads, which must hold cases (``test`` for an evaluation).

    Returns:
        The datalist, for use in a config expression.

    Raises:
        SystemExit: status 2, with the table of problems.
    """
    from dgst_monai.data.validate import check_datalist, format_problems

    path = Path(datalist)
    problems = check_datalist(path, voxels=False, required=split)
    if problems:
        _fail(
            f"the datalist {path} has problems; fix them (dgst-monai data check --datalist {path} reads the voxels "
            f"too):\n{format_problems(problems, base=path.resolve().parent)}"
        )
    labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
    classes = [k for k in labels if str(k).isdigit()] if isinstance(labels, dict) else []
    if len(classes) > int(out_channels):
        _fail(
            f"the datalist {path} has {len(classes)} label classes {sorted(classes, key=int)} but the network has "
            f"out_channels={out_channels}; pass --out_channels {len(classes)} (and train from scratch) or relabel"
        )
    if int(in_channels) != 1:
        _fail(
            f"the network has in_channels={in_channels} but every image of the datalist {path} is one single-channel "
            "CT volume; pass --in_channels 1"
        )
    return str(path)
