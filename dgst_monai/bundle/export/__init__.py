"""A trained or fine-tuned checkpoint as a standalone model-zoo bundle zip: the ``dgst-monai export`` command.

A site that fine-tuned the foundation model on its own scans shares or serves the result as a MONAI bundle of
its own. :func:`export_bundle` writes one from the source bundle's folder and the checkpoint:

* ``configs/train.json`` and ``configs/inference.json`` with the network the checkpoint was trained with written
  out as ``"plan": {...}`` (:meth:`dgst_monai.networks.DynUNetPlan.to_config`; the ``preset`` that chose it is
  dropped, since the weights fix the topology); an overlay named by ``--preset`` (``cpu_small``: the bundle's
  ``configs/cpu_small.json``) is merged in first. The plan comes from the training record beside the checkpoint,
  else from the network preset;
* ``models/model.pt`` (the checkpoint), ``models/normalization.json`` (its CT normalisation) and
  ``models/model.ts`` (TorchScript by ``monai.bundle.ckpt_export``: scripted, or traced where scripting fails,
  as for SwinUNETR; checked to give the checkpoint's output);
* ``configs/metadata.json`` with a new version whose ``changelog`` entry names the method, shots and data (from
  the training record), ``eval_metrics`` from an evaluation ``summary.json`` and the versions it was exported
  with; ``docs/README.md`` with a section on the export; ``large_files.yml`` listing only files too large for
  the model zoo (which then need ``weights_url``).

Three steps, one module each: :mod:`~dgst_monai.bundle.export.stage` writes the bundle's folder in a scratch
folder, :mod:`~dgst_monai.bundle.export.verify` runs the model zoo's checks on a copy of it
(:func:`verify_bundle`), and :mod:`~dgst_monai.bundle.export.zip` packs it. The training record is
:mod:`dgst_monai.bundle.record`'s (its names are exported here too).

Example::

    from dgst_monai.bundle.export import export_bundle

    export_bundle("bundles/ln_ct_dynunet", "tuned/model.pt", "ln_ct_dynunet_site.zip",
                  evaluation="tuned/eval/summary.json")
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dgst_monai.bundle.export.stage import NO_EVALUATION, RUN_OUTPUTS, read_export_source, stage_bundle
from dgst_monai.bundle.export.verify import (
    MAX_FILE_BYTES,
    REQUIRED_FILES,
    REQUIRED_METADATA,
    BundleCheckError,
    bundle_workflow,
    verify_bundle,
    verify_network,
)
from dgst_monai.bundle.export.zip import checked_output, zip_bundle
from dgst_monai.bundle.record import RECORD_FILE, load_training_record, save_training_record

__all__ = [
    "MAX_FILE_BYTES",
    "NO_EVALUATION",
    "RECORD_FILE",
    "REQUIRED_FILES",
    "REQUIRED_METADATA",
    "RUN_OUTPUTS",
    "BundleCheckError",
    "bundle_workflow",
    "export_bundle",
    "load_training_record",
    "save_training_record",
    "verify_bundle",
    "verify_network",
]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dgst-monai-export-") as folder:
        yield Path(folder)


def export_bundle(
    bundle: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    preset: str | None = None,
    evaluation: str | os.PathLike[str] | None = None,
    version: str | None = None,
    changelog: str | None = None,
    weights_url: str | None = None,
    check_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint`` as a standalone bundle zip made from ``bundle``, after the model zoo's checks.

    Args:
        bundle: the source bundle folder (e.g. ``bundles/ln_ct_dynunet``), the one the checkpoint was trained
            or fine-tuned with.
        checkpoint: the model, e.g. ``tuned/model.pt`` (a state dict, or a training state with ``model``);
            ``normalization.json`` must lie beside it, ``training_record.json`` normally does.
        output: the zip to write, ``<name>.zip``; ``<name>`` (letters, digits, ``_``) is the bundle's folder name
            in the zip.
        preset: the network the checkpoint was trained with, if it has no training record: one of the
            bundle's overlay configs (``cpu_small``, or a path), merged into ``train.json`` and
            ``inference.json``, or a value of their ``preset`` key (``cpu-small``). With a record, it must agree.
        evaluation: the fine-tuned model's ``summary.json`` (from ``configs/evaluate.json``), for
            ``eval_metrics``; without it the exported metadata says the model was not evaluated.
        version: the exported bundle's version; default the source's with the patch number raised.
        changelog: the version's changelog entry; default written from the training record (needed without one).
        weights_url: where ``models/`` will be published, for files over the zoo's 25 MB limit (listed with
            their md5 in ``large_files.yml``); the zip contains them either way.
        check_overrides: config overrides for the train workflow's check, e.g. ``{"datalist": "datalist.json"}``
            (default: the bundle's own default data, generated in a scratch folder).

    Returns:
        The zip written.

    Raises:
        FileNotFoundError: missing bundle, checkpoint, normalisation, evaluation summary or preset overlay.
        ValueError: a bad output name, no way to write the changelog, a preset that disagrees with the record, a
            checkpoint that does not fit the network, files too large without ``weights_url``.
        BundleCheckError: the staged bundle fails the model zoo's checks.
        RuntimeError: the TorchScript model does not reproduce the checkpoint.

    Example::

        export_bundle("bundles/ln_ct_dynunet", "tuned/model.pt", "ln_ct_dynunet_site.zip",
                      evaluation="tuned/eval/summary.json")
    """
    out = checked_output(output)
    source = read_export_source(
        bundle, checkpoint, preset=preset, evaluation=evaluation, version=version, changelog=changelog
    )
    with _scratch() as scratch:
        stage = scratch / out.stem
        stage_bundle(source, stage, weights_url)
        check = scratch / "check" / out.stem  # the checks may write run outputs: not into the bundle
        shutil.copytree(stage, check)
        verify_bundle(check, check_overrides)
        zip_bundle(stage, out)
    logger.info(f"exported {source.checkpoint} as bundle {out.stem} version {source.version} to {out}")
    return out
