"""Start MONAI Label on our bundles: ``dgst-monai serve``.

The ``monailabel`` launcher is a shell script that runs whichever ``python`` comes first on ``PATH``; the server
is started here as ``<this Python> -m dgst_monai.serve.pydicom3 start_server`` (MONAI Label's ``monailabel.main``
with the alias it needs under pydicom 3), on the loopback address unless told
otherwise, with :mod:`dgst_monai.serve.asgi` as its web application and the app folder's ``tmp/`` as its
temporary folder. Our app looks nothing up online (no model zoo, no SAM weights, no DICOM tools).

Example::

    from dgst_monai.serve.launcher import serve

    serve(["bundles/ln_ct_dynunet"], studies="ct_studies", checkpoints=["model.pt"], presets=["cpu-small"])
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dgst_monai.serve.layout import ServedBundle, lay_out_app

__all__ = ["INSTALL_HINT", "default_app_dir", "pair_up", "serve", "server_command"]

INSTALL_HINT = 'pip install -e ".[serve]" && pip install --no-deps -r requirements/serve.txt'


def default_app_dir(studies: str | os.PathLike[str]) -> Path:
    """The app folder used when none is given: ``<studies>_monailabel`` beside the studies folder."""
    folder = Path(studies).expanduser().resolve()
    return folder.with_name(f"{folder.name}_monailabel")


def pair_up(
    bundles: Sequence[str | os.PathLike[str]],
    checkpoints: Sequence[str | os.PathLike[str] | None] | None = None,
    presets: Sequence[str | None] | None = None,
) -> list[ServedBundle]:
    """Match each bundle with its checkpoint and preset (one of each per bundle; a single preset serves all).

    Raises:
        ValueError: the numbers do not match.
        FileNotFoundError: as :meth:`ServedBundle.from_paths`.
    """
    checkpoints = list(checkpoints) if checkpoints else [None] * len(bundles)
    presets = list(presets) if presets else [None]
    if len(presets) == 1:
        presets = presets * len(bundles)
    if len(checkpoints) != len(bundles) or len(presets) != len(bundles):
        raise ValueError(
            f"{len(bundles)} bundle(s), {len(checkpoints)} checkpoint(s) and {len(presets)} preset(s): give one "
            "checkpoint per bundle, in the same order (or none: <bundle>/models/model.pt), and one preset per "
            "bundle or a single one"
        )
    return [ServedBundle.from_paths(b, c, p) for b, c, p in zip(bundles, checkpoints, presets)]


def server_command(app_dir: Path, studies: Path | str, host: str, port: int) -> list[str]:
    """The command line of the MONAI Label server, run with this Python."""
    return [
        sys.executable, "-m", "dgst_monai.serve.pydicom3", "start_server",
        "--app", str(app_dir), "--studies", str(studies),
        "--host", host, "--port", str(int(port)),
        "--uvicorn_app", "dgst_monai.serve.asgi:app",
    ]  # fmt: skip


def serve(
    bundles: Sequence[str | os.PathLike[str]],
    studies: str | os.PathLike[str],
    checkpoints: Sequence[str | os.PathLike[str] | None] | None = None,
    presets: Sequence[str | None] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_dir: str | os.PathLike[str] | None = None,
    replace_process: bool = True,
    dry_run: bool = False,
    structures: str | None = None,
    store_format: str = "dicom-seg",
) -> int:
    """Lay out the app folder and run the MONAI Label server on it until it stops.

    Args:
        bundles: bundle folders; each is served as ``/infer/<folder name>`` and ``/train/<folder name>``.
        studies: the studies folder (NIfTI / NRRD volumes; created if missing; submitted labels go to
            ``<studies>/labels/final/``), or a DICOMweb PACS, ``http://host:port/dicom-web``
            (:class:`dgst_monai.serve.pacs.PacsDatastore`; the app folder then defaults to ``pacs_monailabel``
            in the working directory).
        checkpoints: foundation weights per bundle (default ``<bundle>/models/model.pt``), each with its
            ``normalization.json``.
        presets: the network preset the weights were trained with, per bundle or one for all (default the
            bundle's own, ``paper``).
        host: address to listen on; the loopback address by default (only this machine can connect).
        port: port to listen on.
        app_dir: the app folder (default :func:`default_app_dir`); fine-tunes are kept there across restarts.
        replace_process: replace this process by the server (its PID is then the server's) rather than wait
            for a child process.
        dry_run: lay out the app and print the server's command line, but do not start it.
        structures: PACS only: globs on RTSTRUCT ROI / SEG segment names that make the PACS's prior contours
            training labels (e.g. ``'LN*,*node*'``).
        store_format: PACS only: each inference is stored back as ``dicom-seg`` (default) or ``rtstruct``.

    Returns:
        The server's exit status (only when ``replace_process`` is False or unavailable).

    Raises:
        ModuleNotFoundError: MONAI Label is not installed (the message says how to install it).
    """
    if importlib.util.find_spec("monailabel") is None:
        raise ModuleNotFoundError(f"MONAI Label is not installed; install the server with: {INSTALL_HINT}")
    served = pair_up(bundles, checkpoints, presets)  # before anything is written
    pacs = str(studies).startswith(("http://", "https://"))
    if pacs:
        from dgst_monai.dicom.labels import parse_structures
        from dgst_monai.dicom.writers import DICOM_FORMATS

        if store_format not in DICOM_FORMATS:
            raise ValueError(f"--store_format must be one of {', '.join(DICOM_FORMATS)}, got {store_format!r}")
        settings = {"structures": list(parse_structures(structures)) if structures else [], "store_format": store_format}
        source: str | Path = str(studies).rstrip("/")
        app = lay_out_app(app_dir or Path.cwd() / "pacs_monailabel", served, pacs=settings)
    else:
        if structures is not None:
            raise ValueError("--structures applies to a PACS (--studies http://host:port/dicom-web); a studies "
                             "folder takes labels through the label API")
        source = Path(studies).expanduser().resolve()
        source.mkdir(parents=True, exist_ok=True)
        app = lay_out_app(app_dir or default_app_dir(source), served)
    command = server_command(app, source, host, port)
    # everything the server writes stays in the app folder: temporary files, MONAI Label's upload sessions
    env = {
        **os.environ,
        "TMPDIR": str(app / "tmp"),
        "MONAI_LABEL_SESSION_PATH": str(app / "sessions"),
        "PYTHONUNBUFFERED": "1",
    }
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"dgst-monai serve: listening on {host}, reachable from other machines; MONAI Label has no "
              "authentication unless you configure it", flush=True)
    if dry_run:
        print(shlex.join(command))
        return 0
    print(f"dgst-monai serve: http://{host}:{port}/  app {app}  studies {source}", flush=True)
    if replace_process and os.name == "posix":
        os.execve(sys.executable, command, env)
    return subprocess.call(command, env=env)
