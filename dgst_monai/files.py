"""Atomic file writes, JSON reading and safe (``weights_only``) loading of PyTorch files.

A reader, or a crash, sees the previous file or the whole new one.

Every file dgst_monai writes (datalists, splits, reports, normalization, deltas, training states, phantoms) goes
through :func:`atomic_open`: the data are written to a temporary file in the target's folder (same file system,
so the final rename is atomic), flushed and fsynced, then renamed over the target. The result has the
permissions a plain ``open(path, "w")`` would give: a new file gets ``0o666`` minus the umask, a replaced file
keeps its mode. (``tempfile.mkstemp`` would leave ``0o600``, readable by its owner only.) On any error the
temporary file is removed and the target is left as it was.

Every checkpoint, training state and delta is read through :func:`load_torch_file`: ``torch.load(...,
weights_only=True)``, so a file that carries arbitrary pickled objects (which would run code on a plain
``torch.load``) is refused with :class:`UnsafeFileError`, and a truncated or corrupt one with
:class:`DamagedFileError`, both naming the file.

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
import pickle
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DamagedFileError",
    "UnsafeFileError",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "load_torch_file",
    "read_json",
    "remove_interrupted_writes",
]

_NEW_FILE_MODE = 0o666  # what open() asks for; the kernel takes the umask off


class DamagedFileError(RuntimeError):
    """A file that is truncated, corrupt or otherwise unreadable (an image, a checkpoint); the message names it.

    A ``RuntimeError``, as the readers' own failures are, so existing ``except RuntimeError`` handling still
    applies.
    """


class UnsafeFileError(pickle.UnpicklingError):
    """A PyTorch file refused by ``torch.load(weights_only=True)``: it carries pickled Python objects beyond
    tensors and plain containers, which a plain ``torch.load`` would execute. The message names the file."""


def _create_temporary(target: Path) -> tuple[int, Path]:
    """Open a new, uniquely named file beside ``target``: ``(descriptor, path)``."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)  # a replaced file keeps its permissions, as with open()
    except FileNotFoundError:
        mode = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        # unique per writer, so that concurrent writers (DDP ranks writing the same file) never share one
        tmp = _temporary_name(target)
        try:
            fd = os.open(tmp, flags, _NEW_FILE_MODE if mode is None else mode)
        except FileExistsError:
            continue
        if mode is not None:
            os.chmod(tmp, mode)  # os.open's mode is filtered by the umask; the old file's mode is not
        return fd, tmp
    raise FileExistsError(f"could not create a temporary file beside {target}")


_TOKEN_HEX = 6  # bytes of randomness in a temporary name: 12 hex digits


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(_TOKEN_HEX)}.tmp")


def remove_interrupted_writes(folder: str | os.PathLike[str], name: str = "*") -> list[Path]:
    """Remove the temporary files that interrupted atomic writes (a kill, a power cut) left in ``folder``.

    Args:
        folder: the folder of the files written.
        name: the written files' name, or a glob pattern of names (``"training_state_epoch=*.pt"``).

    Returns:
        The files removed.

    Example::

        remove_interrupted_writes("models", "model.pt")  # e.g. [Path("models/.model.pt.3f9c0a1b2d4e.tmp")]
    """
    hex_digits = "[0-9a-f]" * (2 * _TOKEN_HEX)
    removed = sorted(Path(folder).glob(f".{name}.{hex_digits}.tmp"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {file} is not valid JSON: {err}") from None


def load_torch_file(
    path: str | os.PathLike[str], what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what is wrong.

    Only tensors, numbers, strings and plain containers load: a pickled class or function (which a plain
    ``torch.load`` would call, e.g. through ``__reduce__``) is refused before anything of it runs.

    Args:
        path: the file.
        what: what the file is, for the messages (``"checkpoint"``, ``"training state"``, ``"delta"``).
        map_location: as for :func:`torch.load`.
        mmap: memory-map the tensors (reading keys and shapes costs no copy of the weights).

    Returns:
        The loaded object.

    Raises:
        FileNotFoundError: no such file.
        UnsafeFileError: the file holds pickled objects that ``weights_only`` loading does not allow.
        DamagedFileError: truncated, corrupt or not a PyTorch file.

    Example::

        state = load_torch_file("models/model.pt")
    """
    import torch  # here, so that writing JSON does not need torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist")
    try:
        return torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" not in text.lower():  # a short or garbled pickle stream, not a forbidden object
            raise DamagedFileError(f"{what} {file} is truncated or corrupt: {_first_line(text)}") from None
        # torch names what it refused ("Unsupported global: GLOBAL posix.system ...") among paragraphs of advice
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "objects that are not weights")
        reason = reason.removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip().rstrip(".")
        raise UnsafeFileError(
            f"{what} {file} refused: it carries pickled Python objects, not only tensors and plain containers "
            f"({reason}); loading it with torch.load(weights_only=False) could run arbitrary code. Use files "
            "written by dgst_monai / MONAI (state dicts), or re-save the state dict on a machine you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedFileError(
            f"{what} {file} cannot be read as a PyTorch file (truncated, corrupt or another format): "
            f"{_first_line(str(err))}"
        ) from None


def _first_line(text: str) -> str:
    """The first sentence of an error text (torch appends paragraphs of advice), or what kind of failure it was."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].split(". ")[0].rstrip(".")[:300] if lines else "the file ends early"
