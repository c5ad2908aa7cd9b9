"""The ``dgst-monai`` command (python-fire), with a check that refuses a mis-bound command line before it runs.

Commands: ``demo``, ``predict``, ``serve``, ``methods``, ``import-nnunet``, ``export``, ``delta export|apply``,
``data synth|index|check|split|cards|card`` and ``benchmark`` (``benchmark report DIR``). Each is a thin call into the
library; heavy imports happen inside the
command so that ``dgst-monai --help`` stays fast. Every option is spelled out (``--output``, never ``-o``), and
the only values that may go without an option name are a command's required arguments (``data check
DATALIST``) and the scans of ``predict``.

fire binds a value without an option name to the next parameter not yet given (``predict --input a.nii.gz
b.nii.gz`` once set ``mirror='b.nii.gz'``), keeps only the last of a repeated option, reads ``--mirror false``
as the string ``'false'`` (which is true), and reports an unknown option or a left-over value only after the
command has run. :func:`check_command_line` applies fire's rules to the command line first and refuses all of
these, naming the option to use.

Example::

    dgst-monai predict --bundle ln_ct_dynunet --checkpoint tuned/model.pt --input a.nii.gz b.nii.gz --output masks
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import fire

from dgst_monai.data.commands import DataCommands
from dgst_monai.protocol.commands import BenchmarkCommands

__all__ = ["REPEATABLE", "CommandLineError", "Commands", "check_command_line", "command_help", "main", "merge_repeated_options"]


class Data(DataCommands):
    """Datasets: synthetic CT phantoms, indexing a download, validation, few-shot splits, dataset cards."""


class Benchmark(BenchmarkCommands):
    """The paper's protocol: methods x shots x seeds, DSC / NSD / lymph-node metrics; ``benchmark report DIR``."""


class Delta:
    """Sparse weight deltas: store only the entries a fine-tune changed."""

    def export(self, *, base: str, tuned: str, output: str) -> str:
        """Write the entries of ``tuned`` that differ from ``base`` (indices + exact values) to ``output``."""
        from dgst_monai.delta import save_delta

        return _report(save_delta(str(base), str(tuned), str(output)).as_dict())

    def apply(self, *, base: str, delta: str, output: str) -> str:
        """Rebuild the fine-tuned weights, bit-identical, from ``base`` and ``delta`` into ``output``."""
        from dgst_monai.delta import load_and_apply

        return _report(load_and_apply(str(base), str(delta), str(output)).as_dict())


def _report(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2)


class Commands:
    """Few-shot fine-tuning of a CT lymph-node segmentation foundation model with DGST (MONAI bundles)."""

    def __init__(self) -> None:
        self.data = Data()
        self.delta = Delta()
        self.benchmark = Benchmark()

    def demo(self, *, output: str | None = None, size: str = "default", shots: int | None = None, seed: int = 0) -> None:
        """Synthesise CT, pre-train a small foundation model, fine-tune it (full vs DGST) on ``shots`` target
        cases, evaluate both on held-out target cases and print DSC / NSD, beside the DSC each model retains on
        held-out source (head-and-neck) cases. About 10 minutes on a 2-core CPU
        (``--size tiny``: about a minute). Everything is written under ``--output`` (default
        ``runs/demo-<time>``)."""
        from dgst_monai.demo import run_demo

        run_demo(output=None if output is None else str(output), size=str(size), shots=shots, seed=seed)

    def methods(self, *, network: str | None = None, steps: int | None = None, gamma: int = 1) -> str:
        """List the fine-tuning methods (``--method`` of the finetune config).

        With ``--network NAME`` (dynunet, dynunet_resenc, swinunetr, swinunetr_v2, or a planner preset such as
        ``paper`` / ``cpu-small``), a table of trainable parameters per method on that network, and with
        ``--steps N`` the most entries each method can change in N optimizer steps.
        """
        from dgst_monai.methods import METHODS

        if network is None:
            return "\n".join(f"{m.name:14s} {m.label}" for m in METHODS.values())
        from dgst_monai.accounting import account_methods, format_table

        return format_table(account_methods(_network(network), gamma=gamma, steps=steps))

    def predict(
        self,
        *scans: str,
        bundle: str,
        output: str,
        input: str | Sequence[str] | None = None,  # noqa: A002 - the command's --input
        checkpoint: str | None = None,
        mirror: bool = False,
        preset: str | None = None,
        format: Any = "nifti",  # noqa: A002 - the command's --format
    ) -> str:
        """Segment lymph nodes in CT scans (NIfTI / NRRD files, DICOM series folders, folders of volumes) with a
        bundle's inference config; writes ``<case>_lymph_nodes.nii.gz`` masks with each input's exact geometry
        into ``--output``. ``--format nifti,dicom-seg,rtstruct`` also writes, for DICOM series inputs,
        ``<case>_lymph_nodes_seg.dcm`` (DICOM-SEG) and ``<case>_lymph_nodes_rtstruct.dcm`` (RTSTRUCT) referencing
        the series.

        The scans follow ``--input`` (``--input a.nii.gz b.nii.gz``) or stand on their own
        (``predict a.nii.gz b.nii.gz --bundle ...``). ``--bundle`` is a bundle folder or the name of a shipped
        bundle (``ln_ct_dynunet``); ``--preset`` the network the checkpoint was trained with (``cpu-small``).
        """
        from dgst_monai.bundle.resources import find_bundle
        from dgst_monai.predict import predict

        given = [] if input is None else [input] if isinstance(input, (str, int, float)) else list(input)
        sources = [str(s) for s in [*given, *scans]]
        if not sources:
            raise CommandLineError("predict: no scan given: --input a.nii.gz [b.nii.gz ...]")
        masks = predict(
            find_bundle(str(bundle)),
            sources,
            str(output),
            checkpoint=None if checkpoint is None else str(checkpoint),
            mirror=mirror,
            preset=None if preset is None else str(preset),
            format=",".join(format) if isinstance(format, (list, tuple)) else str(format),
        )
        return "\n".join(masks)

    def import_nnunet(self, model_folder: str, *, output: str = "model.pt", fold: int | str = 0) -> str:
        """Convert an nnU-Net v2 model folder (plans.json, fold_*/checkpoint_final.pth) into an
        ``ln_ct_dynunet`` checkpoint ``--output`` plus the network override JSON written next to it."""
        from dgst_monai.networks.nnunet_import import export_nnunet

        return str(export_nnunet(str(model_folder), str(output), fold=fold))

    def export(
        self,
        *,
        bundle: str,
        checkpoint: str,
        output: str,
        preset: str | None = None,
        evaluation: str | None = None,
        version: str | None = None,
        changelog: str | None = None,
        weights_url: str | None = None,
    ) -> str:
        """Package a trained or fine-tuned checkpoint as a standalone model-zoo bundle zip ``--output``
        (``<name>.zip``): configs with the network it was trained with, ``models/model.pt``, ``model.ts`` and
        ``normalization.json``, a new version whose changelog names the method, shots and data (from the
        ``training_record.json`` beside the checkpoint) and ``eval_metrics`` from ``--evaluation``
        (``<ckpt_dir>/eval/summary.json``). It passes the model zoo's checks before it is written."""
        from dgst_monai.bundle.export import NO_EVALUATION, export_bundle
        from dgst_monai.bundle.resources import find_bundle

        if evaluation is None:
            print(f"dgst-monai export: note: {NO_EVALUATION}", file=sys.stderr)

        return str(
            export_bundle(
                find_bundle(str(bundle)),
                str(checkpoint),
                str(output),
                preset=None if preset is None else str(preset),
                evaluation=None if evaluation is None else str(evaluation),
                version=None if version is None else str(version),
                changelog=None if changelog is None else str(changelog),
                weights_url=None if weights_url is None else str(weights_url),
            )
        )

    def serve(
        self,
        *bundles: str,
        bundle: str | Sequence[str] | None = None,
        studies: str,
        checkpoint: str | Sequence[str] | None = None,
        preset: str | Sequence[str] | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        app_dir: str | None = None,
        dry_run: bool = False,
        structures: Any = None,
        store_format: str = "dicom-seg",
    ) -> None:
        """Serve bundles with MONAI Label (3D Slicer, OHIF) on ``--studies``: ``/infer/<bundle>`` segments a
        study or an upload, ``/train/<bundle>`` with ``{"method": "dgst", "shots": N}`` fine-tunes the
        foundation on the studies with a submitted label, and the next inference uses the fine-tune.

        Several bundles repeat ``--bundle`` (``--bundle a --bundle b``), follow it (``--bundle a b``) or come as a
        list (``--bundle "[a, b]"``); default ``ln_ct_dynunet``. ``--checkpoint`` gives the foundation weights of each
        bundle in the same order (one
        path, or a list), ``--preset`` the network they were trained with (one for all, or a list). Listens on
        the loopback address unless ``--host`` says otherwise; the app folder (default ``<studies>_monailabel``)
        keeps the fine-tunes. ``--dry_run`` lays out the app and prints the server's command line.

        ``--studies http://host:port/dicom-web`` serves a DICOMweb PACS (Orthanc, ...): each inference of a PACS
        series is stored back into it as a DICOM-SEG (``--store_format rtstruct``: an RTSTRUCT), and the PACS's
        RTSTRUCT / SEG contours whose ROI / segment names match ``--structures 'LN*,*node*'`` are the labels a
        fine-tune trains on, with those submitted through the label API."""
        from dgst_monai.bundle.resources import find_bundle
        from dgst_monai.serve.launcher import serve

        def listed(value: Any) -> list[str]:  # one value or a list; fire leaves "[a/b.pt, c/d.pt]" a string
            if value is None:
                return []
            if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
                return [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            return [str(value)] if isinstance(value, (str, int, float)) else [str(v) for v in value]

        names = [*listed(bundle), *bundles] or ["ln_ct_dynunet"]
        serve(
            [find_bundle(name) for name in names],
            str(studies),
            checkpoints=listed(checkpoint) or None,
            presets=listed(preset) or None,
            host=str(host),
            port=int(port),
            app_dir=None if app_dir is None else str(app_dir),
            dry_run=dry_run,
            structures=None if structures is None else ",".join(structures) if isinstance(structures, (list, tuple)) else str(structures),
            store_format=str(store_format),
        )


def _network(name: str) -> Any:
    from dgst_monai.networks.factory import NETWORKS, build_network
    from dgst_monai.networks.planner import plan_preset

    if name in NETWORKS:
        return build_network(name)
    try:
        return plan_preset(name).network()
    except (KeyError, ValueError):
        raise ValueError(f"unknown network {name!r}: use one of {', '.join(NETWORKS)} or a planner preset") from None


class CommandLineError(ValueError):
    """A command line that fire would bind to a parameter the user did not name, or could not bind at all."""


def check_command_line(root: Any, argv: Sequence[str]) -> None:
    """Refuse a command line of ``root``'s commands before anything runs.

    The command is found by walking ``root``'s members (``data index`` -> ``root.data.index``); its arguments are
    then matched to its signature by fire 0.7's rules, and refused if a value would bind to a parameter that
    has a default without being named, a value is left over, an option is unknown, given twice or abbreviated
    (``-o``), or a switch (a parameter with a boolean default) gets a value other than ``True`` / ``False``.
    Help (``--help``), fire's own flags (after ``--``) and chaining (``-``) are left to fire.

    Args:
        root: the object fire is given (``Commands()``).
        argv: the arguments after the program name.

    Raises:
        CommandLineError: what is wrong and what to write instead.

    Example:
        >>> check_command_line(Commands(), ["demo", "tiny"])
        Traceback (most recent call last):
        ...
        dgst_monai.cli.CommandLineError: demo: unexpected argument 'tiny'; options: --output, --preset, --shots, --seed
    """
    if any(arg in ("--", "-", "--help", "-h") for arg in argv):
        return
    component, path, tokens = _find_command(root, argv)
    if inspect.isroutine(component):
        _check_arguments(" ".join(path), inspect.signature(component), tokens)
    elif path and callable(component) and not inspect.isclass(component):
        _check_arguments(" ".join(path), inspect.signature(component.__call__), tokens)


def _find_command(root: Any, argv: Sequence[str]) -> tuple[Any, list[str], list[str]]:
    """The member of ``root`` that ``argv`` names (``data index`` -> ``root.data.index``), its path and the rest."""
    component, path, tokens = root, [], list(argv)
    while tokens and not inspect.isroutine(component):
        name = tokens[0]
        member = getattr(component, name.replace("-", "_"), None)
        if name.startswith(("-", "_")) or member is None:
            break  # options of a callable group (``benchmark --output``); else fire reports the unknown command
        component, path, tokens = member, [*path, name], tokens[1:]
    return component, path, tokens


def command_help(root: Any, argv: Sequence[str]) -> str | None:
    """The help of the command ``argv`` names when it asks for it (``--help`` / ``-h``), else None.

    fire's generated help lists one-letter aliases (``-o``) that :func:`check_command_line` refuses; this one
    lists the options as they must be written. Groups of commands (``dgst-monai data --help``) return None and
    are left to fire, which lists their commands.

    Example::

        print(command_help(Commands(), ["predict", "--help"]))  # usage line, description, --options
    """
    if not any(a in ("--help", "-h") for a in argv) or "--" in argv:
        return None
    component, path, _ = _find_command(root, [a for a in argv if a not in ("--help", "-h")])
    if not path:
        return None
    if not inspect.isroutine(component):
        if not callable(component) or inspect.isclass(component):
            return None
        component = component.__call__
    signature = inspect.signature(component)
    parts = []
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            parts.append(f"[{param.name.upper()} ...]")
        elif param.kind is param.POSITIONAL_OR_KEYWORD and param.default is param.empty:
            parts.append(param.name.upper())
        elif param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
            if isinstance(param.default, bool):
                parts.append(f"[--{param.name}]")
            elif param.default is param.empty:
                parts.append(f"--{param.name} {param.name.upper()}")
            elif param.default is None:
                parts.append(f"[--{param.name} {param.name.upper()}]")
            else:
                parts.append(f"[--{param.name} {param.default!r}]")
    doc = inspect.cleandoc(component.__doc__ or "")
    return f"usage: dgst-monai {' '.join(path)} {' '.join(parts)}\n\n{doc}".rstrip()


#: Options a command takes once per item, repeated (``serve --bundle a --bundle b``).
REPEATABLE: dict[str, tuple[str, ...]] = {"serve": ("bundle", "checkpoint", "preset")}


def merge_repeated_options(argv: Sequence[str]) -> list[str]:
    """``argv`` with each repeated option of :data:`REPEATABLE` merged into one list-valued option.

    fire keeps only the last of a repeated option, so ``serve --bundle a --bundle b`` becomes
    ``serve --bundle=[a, b]`` (the form the command reads as a list). Options given once, and every other
    command, are left as they are (a repeated option is then refused by :func:`check_command_line`).

    Example:
        >>> merge_repeated_options(["serve", "--bundle", "a", "--studies", "s", "--bundle=b"])
        ['serve', '--studies', 's', '--bundle=[a, b]']
    """
    args = list(argv)
    names = REPEATABLE.get(args[0], ()) if args else ()
    for name in names:
        spots = [i for i, a in enumerate(args) if a == f"--{name}" or a.startswith(f"--{name}=")]
        if len(spots) < 2:
            continue
        values: list[str] = []
        drop: set[int] = set()
        for i in spots:
            if args[i].startswith(f"--{name}="):
                values.append(args[i].partition("=")[2])
                drop.add(i)
            elif i + 1 < len(args) and not _is_flag(args[i + 1]):
                values.append(args[i + 1])
                drop.update((i, i + 1))
            else:
                raise CommandLineError(f"{args[0]}: --{name} needs a value")
        args = [a for i, a in enumerate(args) if i not in drop] + [f"--{name}=[{', '.join(values)}]"]
    return args


def _is_flag(arg: str) -> bool:
    """fire's test: ``--anything`` or a hyphen and a letter (``-1`` and ``-.5`` are values)."""
    return arg.startswith("--") or re.match("^-[a-zA-Z]", arg) is not None


def _check_arguments(command: str, signature: inspect.Signature, tokens: list[str]) -> None:
    params = list(signature.parameters.values())
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    options = ", ".join(f"--{name}" for name in named) or "none"
    takes_any_option = any(p.kind is p.VAR_KEYWORD for p in params)
    given: set[str] = set()
    values: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not _is_flag(token):
            values.append(token)
            continue
        key, has_value, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        switch_syntax = not has_value and (i == len(tokens) or _is_flag(tokens[i]))
        if switch_syntax and key not in named and key.startswith("no") and key[2:] in named:
            key = key[2:]  # fire's --nomirror
        if key not in named and not takes_any_option:
            full = [name for name in named if name.startswith(key)] if len(key) == 1 else []
            fix = f"write it out: --{full[0]}" if len(full) == 1 else f"options: {options}"
            raise CommandLineError(f"{command}: unknown option {token.partition('=')[0]}; {fix}")
        if key in given:
            hint = " (several scans: --input a b)" if "input" in named else ""
            raise CommandLineError(f"{command}: --{key} given twice; give it once{hint}")
        given.add(key)
        switch = key in named and isinstance(named[key].default, bool)
        if switch_syntax:
            if key in named and not switch:
                raise CommandLineError(f"{command}: --{key} needs a value")
            continue
        if not has_value:
            value, i = tokens[i], i + 1
        if switch and value not in ("True", "False"):
            raise CommandLineError(
                f"{command}: --{key} is a switch: write --{key} alone, or --{key}=True / --{key}=False (got {value!r})"
            )
    # fire fills the positional parameters that no option named, in order, with the unnamed values
    for param in (p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in given):
        if not values:
            break
        if param.default is not param.empty:
            raise CommandLineError(
                f"{command}: {values[0]!r} would be taken as --{param.name}; name it: --{param.name} {values[0]}"
            )
        values.pop(0)
    if values and not any(p.kind is p.VAR_POSITIONAL for p in params):
        left = ", ".join(repr(v) for v in values)
        raise CommandLineError(f"{command}: unexpected argument{'s' * (len(values) > 1)} {left}; options: {options}")


#: Errors that are about the user's input, not a defect: a missing, unreadable or damaged file, or one of our
#: own refusals (every error class of dgst_monai names the file and the problem).
_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError
)
#: Set to 1 for the full traceback of an input error.
DEBUG_VARIABLE = "DGST_MONAI_DEBUG"


def _is_input_error(err: BaseException) -> bool:
    return isinstance(err, _INPUT_ERRORS) or type(err).__module__.startswith("dgst_monai.")


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``dgst-monai`` on ``argv`` (default ``sys.argv[1:]``).

    A refused command line exits with status 2; so does an input error (a missing or damaged file, a checkpoint
    that does not fit, ...), with its one-line message instead of a traceback (``DGST_MONAI_DEBUG=1`` shows it).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    commands = Commands()
    usage = command_help(commands, args)
    if usage is not None:
        print(usage)
        return
    try:
        args = merge_repeated_options(args)
        check_command_line(commands, args)
        fire.Fire(commands, command=args, name="dgst-monai")
    except CommandLineError as err:
        print(f"dgst-monai {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if not _is_input_error(err) or os.environ.get(DEBUG_VARIABLE) == "1":
            raise
        group = getattr(commands, args[0].replace("-", "_"), None)
        sub = args[1:2] if len(args) > 1 and hasattr(group, args[1].replace("-", "_")) else []
        command = " ".join([args[0], *sub])
        print(f"dgst-monai {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
