"""Values typed on a ``python -m monai.bundle run`` command line, read as what they say.

``python -m monai.bundle run`` reads every ``--key value`` with fire, which turns ``False`` into the bool
False and ``0`` into the int 0 but leaves ``false`` or ``no`` as the *string* ``"false"`` / ``"no"``, and a
non-empty string is true in Python: ``--resume false`` would resume. A bundle therefore never uses a boolean key
directly but reads it once through :func:`flag`, in its ``settings`` entry, which the consumers refer to::

    "resume": false,
    "settings": {"resume": {"_target_": "dgst_monai.bundle.config_values.flag", "value": "@resume", "name": "resume"}},
    ...
    {"_target_": "dgst_monai.handlers.TrainingStateCheckpoint", "resume": "@settings#resume"}

Example:
    >>> from dgst_monai.bundle.config_values import flag
    >>> [flag(v) for v in (False, "false", "False", "0", 0, "no", "off")]
    [False, False, False, False, False, False, False]
    >>> [flag(v) for v in (True, "true", "1", 1, "yes", "on")]
    [True, True, True, True, True, True]
"""

from __future__ import annotations

from typing import Any

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "flag", "orientation"]

#: Spellings read as True / False (compared in lower case, surrounding blanks ignored).
TRUE_WORDS: frozenset[str] = frozenset({"true", "t", "yes", "y", "on", "1"})
FALSE_WORDS: frozenset[str] = frozenset({"false", "f", "no", "n", "off", "0"})


def flag(value: Any, name: str = "value") -> bool:
    """``value`` as a bool: True / False, 1 / 0, or a word (``true``, ``yes``, ``on`` / ``false``, ``no``, ``off``).

    Args:
        value: what the config (or the command line through fire) holds.
        name: the config key, for the error message.

    Returns:
        The boolean meant.

    Raises:
        ValueError: anything else (``2``, ``"maybe"``, ``None``, a list, ...), with the accepted spellings: a
            typo must stop the run rather than silently pick one.

    Example::

        flag("False", "amp")   # False
        flag("yes", "mirror")  # True
    """
    if isinstance(value, bool):
        return value
    # numpy / torch scalars and plain ints: only exactly 0 or 1 (bool() of 2 is true, but 2 is no yes/no answer)
    if not isinstance(value, str) and hasattr(value, "__index__"):
        number = value.__index__()
        if number in (0, 1):
            return bool(number)
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(
        f"{name} must be true or false, got {value!r}; write one of "
        f"{', '.join(sorted(TRUE_WORDS))} or {', '.join(sorted(FALSE_WORDS))} (e.g. --{name} false)"
    )


def orientation(value: Any, name: str = "orientation") -> str:
    """The ``orientation`` setting: ``"file"`` (keep the file's voxel order) or three axis codes such as ``RAS``.

    Args:
        value: what the config (or the command line) holds.
        name: the config key, for the error message.

    Returns:
        ``"file"``, or the axis codes in upper case, one of L/R, P/A and I/S each, for ``Orientationd``.

    Raises:
        ValueError: anything else, before any scan is read.

    Example::

        orientation("ras")   # "RAS"
        orientation("File")  # "file"
    """
    text = str(value).strip()
    if text.lower() == "file":
        return "file"
    codes = text.upper()
    axes = [next((i for i, pair in enumerate(("LR", "PA", "IS")) if c in pair), None) for c in codes]
    if len(codes) != 3 or sorted(a for a in axes if a is not None) != [0, 1, 2]:
        raise ValueError(
            f"{name} must be 'file' (the file's voxel order, as nnU-Net) or three axis codes with one of L/R, P/A "
            f"and I/S each (e.g. RAS, LPS), got {value!r}"
        )
    return codes


def output_formats(value: Any, name: str = "output_format") -> tuple[str, ...]:
    """The ``output_format`` setting: ``nifti``, ``dicom-seg`` and / or ``rtstruct``, comma-separated or a list.

    Raises:
        ValueError: an unknown or repeated format, or none, before any scan is read.

    Example::

        output_formats("nifti,dicom-seg")  # ("nifti", "dicom-seg")
    """
    from dgst_monai.dicom.writers import parse_formats

    try:
        return parse_formats(value)
    except ValueError as err:
        raise type(err)(f"{name}: {err}") from None


def set_config_key(config: dict[str, Any], key: str, value: Any) -> None:
    """Set one entry of a parsed bundle config as ``monai.bundle run`` merges config files.

    ``a#b`` (or ``a::b``) ids address nested items (list items by index; missing dict levels are created); a
    ``+`` prefix extends a list or updates a dict instead of replacing it. The one rule for every code path that
    writes configs (export overlays, generated bundle variants).

    Example::

        set_config_key(config, "train#handlers#0#epoch_level", False)
        set_config_key(config, "+required_packages_version", {"einops": "0.8.2"})
    """
    import re

    extend = key.startswith("+")
    *parents, last = re.split(r"#|::", key.lstrip("+"))
    target: Any = config
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
    index: int | str = int(last) if isinstance(target, list) else last
    current = target[index] if isinstance(target, list) or index in target else None
    if extend and isinstance(value, list) and isinstance(current, list):
        target[index] = [*current, *value]
    elif extend and isinstance(value, dict) and isinstance(current, dict):
        target[index] = {**current, **value}
    else:
        target[index] = value
