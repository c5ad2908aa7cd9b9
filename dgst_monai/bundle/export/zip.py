"""Packing an exported bundle: the zip named after the bundle, with the bundle's folder at its top.

Example::

    output = checked_output("ln_ct_dynunet_site.zip")  # the bundle's name is "ln_ct_dynunet_site"
    zip_bundle(Path("scratch/ln_ct_dynunet_site"), output)
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from dgst_monai.files import atomic_open

__all__ = ["checked_output", "zip_bundle"]

_BUNDLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def checked_output(output: str | os.PathLike[str]) -> Path:
    """``output`` as an absolute path, checked to be ``<name>.zip`` with a bundle name (letters, digits, ``_``).

    Raises:
        ValueError: another suffix or name.
    """
    out = Path(output).expanduser().resolve()
    if out.suffix != ".zip" or not _BUNDLE_NAME.fullmatch(out.stem):
        raise ValueError(f"output {output} must be <name>.zip, <name> of letters, digits and _ (the bundle's name)")
    return out


def zip_bundle(stage: Path, output: Path) -> None:
    """Zip ``stage`` as ``output`` (written atomically) with the folder's name at the top, as the model zoo packs
    a bundle."""
    with atomic_open(output, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                archive.write(path, f"{stage.name}/{path.relative_to(stage).as_posix()}")
