"""Atomic file writes (a reader, or a crash, sees the previous file or the whole new one) and JSON reading.

Every file dgst_monai writes (datalists, splits, reports, normalization, deltas, training states, phantoms) goes
through :func:`atomic_open`: the data are written to a temporary file in the target's folder (same file system,
so the final rename is atomic), flushed and fsynced, then renamed over the target. The result has the
permissions a plain ``open(path, "w")`` would give: a new file gets ``0o666`` minus the umask, a replaced file
keeps its mode. (``tempfile.mkstemp`` would leave ``0o600``, readable by its owner only.) On any error the
temporary file is removed and the target is left as it was.

Example:
    >>> import json, tempfile
    >>> from dgst_monai.files import atomic_write, atomic_write_json
    >>> folder = tempfile.mkdtemp()
    >>> path = atomic_write_json(f"{folder}/summary.json", {"n_cases": 3})
    >>> json.loads(path.read_text())
    {'n_cases': 3}
    >>> atomic_write(f"{folder}/notes.txt", "done\\n").read_text()
    'done\\n'
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_open", "atomic_torch_save", "atomic_write", "atomic_write_json", "read_json"]

_NEW_FILE_MODE = 0o666  # what open() asks for; the kernel takes the umask off


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Open a new, uniquely named file beside ``target``: ``(descriptor, path)``."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)  # a replaced file keeps its permissions, as with open()
    except FileNotFoundError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # unique per writer, so that concurrent writers (DDP ranks writing the same file) never share one
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, _NEW_FILE_MODE if mode is None else mode)
        except FileExistsError:
            continue
        if mode is not None:
            os.chmod(tmp, mode)  # os.open's mode is filtered by the umask; the old file's mode is not
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file beside {target}")


def _fsync_folder(folder: Path) -> None:
    # the rename itself is durable only once the folder is synced; not every platform can open a folder
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open ``path`` for writing such that it appears complete or not at all.

    Missing parent folders are created. The file is renamed into place when the ``with`` block ends without
    an exception; if it raises, the temporary file is removed and the exception propagates.

    Args:
        path: the file to write.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        encoding: text mode only.
        newline: text mode only, as for :func:`open` (``""`` for CSV writers).

    Yields:
        The open temporary file.

    Raises:
        ValueError: ``mode`` is not ``"w"`` or ``"wb"``.

    Example::

        with atomic_open("eval/per_case_metrics.csv", newline="") as f:
            csv.writer(f).writerows(rows)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(target)
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(target.parent)


def atomic_write(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically.

    Returns:
        The path written.

    Example::

        atomic_write("models/README.txt", "trained with dgst\\n")
    """
    if isinstance(data, bytes):
        with atomic_open(path, "wb") as f:
            f.write(data)
    else:
        with atomic_open(path, "w", encoding=encoding) as f:
            f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically.

    Args:
        path: the file to write.
        obj: JSON-serialisable data.
        indent: as for :func:`json.dumps`.
        **dumps: further :func:`json.dumps` arguments, e.g. ``allow_nan=False``.

    Returns:
        The path written.

    Example::

        atomic_write_json("eval/summary.json", {"dice": {"mean": 0.7}}, allow_nan=False)
    """
    # serialised first: a value JSON cannot hold raises before any file is touched
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (for checkpoints, training states and deltas).

    Returns:
        The path written.

    Example::

        atomic_torch_save({"model": network.state_dict()}, "models/model.pt")
    """
    import torch  # here, so that writing JSON does not need torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The content of a JSON file, with errors that name the file and what it is.

    Args:
        path: the file.
        what: what the file is, for the messages (``"datalist"``, ``"nnU-Net plans"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON.

    Example::

        content = read_json("datalist.json", "datalist")
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist")
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {file} is not valid JSON: {err}") from None
