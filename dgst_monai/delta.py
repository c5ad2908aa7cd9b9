"""Sparse weight deltas: ship a fine-tuned model as the few entries it changed in the foundation model.

A strict DGST tune changes at most ``steps * gamma`` entries per filter of every kernel, so a site can send
(or archive) a delta of a few kilobytes instead of the whole checkpoint; whoever holds the same foundation
checkpoint rebuilds the fine-tuned weights bit for bit.

Delta format (a ``dict`` saved with ``torch.save``, loadable with ``weights_only=True``)::

    format, version          "dgst_monai.sparse_delta", 1
    base_sha256              checksum of the base state dict (keys, dtypes, shapes, bytes)
    tuned_sha256             checksum of the tuned state dict, verified after rebuilding
    keys                     every key of the tuned state dict, in order
    aliases                  {key: earlier key} for tensors that share storage (DynUNet's skip_layers.*)
    entries                  {key: {"shape", "dtype", "indices", "values"}} for the changed tensors only;
                             indices are flat (row-major) int32 / int64 positions, values the exact tuned
                             values in the tensor's dtype; indices is None when storing the whole tensor is
                             smaller (most entries changed)
    stats                    entries / tensors changed and total

"Changed" is bitwise: ``-0.0`` vs ``0.0`` or a NaN payload count as changes, so the rebuild is exact.
Nothing here prints; the file-level helpers return :class:`DeltaStats` for the caller to report.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dgst_monai.files import atomic_torch_save, load_torch_file

FORMAT = "dgst_monai.sparse_delta"
VERSION = 1

StateDict = Mapping[str, torch.Tensor]

# same-size integer views make the comparison bitwise (0.0 vs -0.0, NaN payloads)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class DeltaMismatchError(ValueError):
    """The delta was not made against this base checkpoint (checksum differs)."""


@dataclass(frozen=True)
class DeltaStats:
    """Size of a delta.

    Attributes:
        entries_changed: tensor entries stored in the delta (aliases counted once).
        entries_total: entries of the tuned state dict (aliases counted once).
        tensors_changed: tensors with at least one changed entry.
        tensors_total: distinct tensors of the tuned state dict.
        delta_bytes: size of the delta file (0 for an in-memory delta).
        full_bytes: size of the full tuned checkpoint file (0 for an in-memory delta).
        base_sha256: checksum of the base state dict the delta applies to.
    """

    entries_changed: int
    entries_total: int
    tensors_changed: int
    tensors_total: int
    delta_bytes: int = 0
    full_bytes: int = 0
    base_sha256: str = ""

    @property
    def changed_fraction(self) -> float:
        """Changed entries / all entries."""
        return self.entries_changed / max(self.entries_total, 1)

    @property
    def size_ratio(self) -> float:
        """Delta file bytes / full checkpoint bytes (0 if the sizes are unknown)."""
        return self.delta_bytes / self.full_bytes if self.full_bytes else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with the derived fractions, e.g. for JSON output."""
        return {**asdict(self), "changed_fraction": self.changed_fraction, "size_ratio": self.size_ratio}


def state_checksum(state: StateDict) -> str:
    """SHA-256 over a state dict's keys, dtypes, shapes and raw bytes, independent of key order and device.

    Example::

        >>> state_checksum({"w": torch.zeros(2)}) == state_checksum({"w": torch.zeros(2)})
        True
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = _tensor(state, key)
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def changed_mask(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """True where ``tuned`` differs bitwise from ``base`` (same shape and dtype), on the CPU.

    Example::

        >>> changed_mask(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])).tolist()
        [True, False]
    """
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"cannot compare {base.dtype} {tuple(base.shape)} with {tuned.dtype} {tuple(tuned.shape)}")
    return _bits(base) != _bits(tuned)


def export_delta(base_state: StateDict, tuned_state: StateDict) -> dict[str, Any]:
    """The entries of ``tuned_state`` that differ (bitwise) from ``base_state``, with a checksum of the base.

    Args:
        base_state: the foundation state dict.
        tuned_state: the fine-tuned state dict, same keys, shapes and dtypes (LoRA merged first:
            :func:`dgst_monai.networks.adapters.merge`; the Adapter and spatial-adapter methods add modules, so
            their checkpoints are not deltas of the foundation).

    Returns:
        The delta (format in the module docstring).

    Raises:
        ValueError: the key sets, shapes or dtypes differ.
        TypeError: an entry is not a tensor.

    Example::

        delta = export_delta(foundation.state_dict(), tuned.state_dict())
        rebuilt = apply_delta(foundation.state_dict(), delta)   # bit-identical to tuned.state_dict()
    """
    _check_same_layout(base_state, tuned_state)
    entries: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    storages: dict[tuple[Any, ...], str] = {}
    changed = total = tensors_total = 0
    for key in tuned_state:
        tuned, base = _tensor(tuned_state, key), _tensor(base_state, key)
        alias_of = _alias_key(tuned, storages, key)
        if alias_of is not None:
            aliases[key] = alias_of
            continue
        tensors_total += 1
        total += tuned.numel()
        diff = changed_mask(base, tuned).reshape(-1)
        n = int(diff.sum())
        if n == 0:
            continue
        changed += n
        flat = tuned.detach().cpu().reshape(-1)
        index_dtype = torch.int32 if tuned.numel() <= torch.iinfo(torch.int32).max else torch.int64
        sparse_bytes = n * (_itemsize(index_dtype) + tuned.element_size())
        if sparse_bytes < tuned.numel() * tuned.element_size():
            indices = diff.nonzero().reshape(-1).to(index_dtype)
            values = flat[indices.long()].clone()
        else:
            indices, values = None, flat.clone()
        entries[key] = {"shape": list(tuned.shape), "dtype": str(tuned.dtype), "indices": indices, "values": values}
    return {
        "format": FORMAT,
        "version": VERSION,
        "base_sha256": state_checksum(base_state),
        "tuned_sha256": state_checksum(tuned_state),
        "keys": list(tuned_state),
        "aliases": aliases,
        "entries": entries,
        "stats": {
            "entries_changed": changed,
            "entries_total": total,
            "tensors_changed": len(entries),
            "tensors_total": tensors_total,
        },
    }


def apply_delta(base_state: StateDict, delta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rebuild the tuned state dict from the base state dict and a delta, bit for bit.

    Unchanged tensors are the base's own tensors (not copies); tensors that shared storage in the tuned state
    dict share it again.

    Args:
        base_state: the state dict the delta was exported against.
        delta: from :func:`export_delta` (or :func:`load_delta`).

    Returns:
        The tuned state dict, keys in the tuned order, on the CPU for changed tensors.

    Raises:
        DeltaMismatchError: ``base_state`` is not the delta's base (checksum differs).
        ValueError: not a delta, or the rebuilt weights fail the tuned checksum (corrupt delta).

    Example::

        tuned = apply_delta(load_state_dict_file("foundation.pt")[0], load_delta("delta.pt"))
        network.load_state_dict(tuned)
    """
    _check_format(delta)
    base_sum = state_checksum(base_state)
    if base_sum != delta["base_sha256"]:
        raise DeltaMismatchError(
            f"this delta was exported against a base checkpoint with SHA-256 {delta['base_sha256'][:16]}..., but the "
            f"given base has {base_sum[:16]}...: apply it to the exact foundation checkpoint it was made from"
        )
    missing = [k for k in delta["keys"] if k not in base_state and k not in delta["aliases"]]
    if missing:
        raise ValueError(f"the base state dict lacks keys the delta needs: {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for key in delta["keys"]:
        if key in delta["aliases"]:
            out[key] = out[delta["aliases"][key]]
            continue
        base = _tensor(base_state, key)
        entry = delta["entries"].get(key)
        if entry is None:
            out[key] = base
            continue
        values: torch.Tensor = entry["values"]
        if list(base.shape) != list(entry["shape"]) or str(base.dtype) != entry["dtype"] or values.dtype != base.dtype:
            raise ValueError(
                f"{key}: delta holds {entry['dtype']} {tuple(entry['shape'])}, "
                f"base has {base.dtype} {tuple(base.shape)}"
            )
        if entry["indices"] is None:
            out[key] = values.reshape(entry["shape"]).clone()
        else:
            flat = base.detach().cpu().reshape(-1).clone()
            flat[entry["indices"].long()] = values
            out[key] = flat.reshape(entry["shape"])
    if state_checksum(out) != delta["tuned_sha256"]:
        raise ValueError("the rebuilt weights do not match the delta's tuned checksum: the delta file is corrupt")
    return out


def delta_stats(delta: Mapping[str, Any]) -> DeltaStats:
    """The entry counts of a delta (file sizes 0: see :func:`save_delta` for those)."""
    _check_format(delta)
    return DeltaStats(**delta["stats"], base_sha256=delta["base_sha256"])


# ------------------------------------------------------------------------------------------ files


def load_state_dict_file(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Read a MONAI / PyTorch checkpoint: a raw state dict, or a dict holding one under ``"model"``.

    Returns:
        The state dict (on the CPU) and the key it was found under (``"model"``) or None for a raw one. Other
        entries of a ``{"model": ..., ...}`` checkpoint (optimizer, trainer state) are ignored.

    Raises:
        FileNotFoundError: no such file.
        dgst_monai.files.UnsafeFileError: the file carries pickled objects beyond weights (refused unread).
        dgst_monai.files.DamagedFileError: truncated or corrupt.
        ValueError: the file holds neither.

    Example::

        state, wrapper = load_state_dict_file("models/model.pt")
    """
    checkpoint = load_torch_file(path, "checkpoint")
    if isinstance(checkpoint, Mapping):
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return dict(checkpoint), None
        model = checkpoint.get("model")
        if isinstance(model, Mapping) and model and all(isinstance(v, torch.Tensor) for v in model.values()):
            return dict(model), "model"
    keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(f"{path}: expected a state dict or {{'model': state dict}}, found {keys}")


def load_delta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a delta file written by :func:`save_delta`.

    Raises:
        FileNotFoundError, dgst_monai.files.UnsafeFileError, dgst_monai.files.DamagedFileError: as
            :func:`dgst_monai.files.load_torch_file`.
        ValueError: not a delta.
    """
    delta = load_torch_file(path, "delta")
    _check_format(delta, str(path))
    return delta


def save_delta(
    base_path: str | os.PathLike[str], tuned_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> DeltaStats:
    """Write the sparse delta between two checkpoint files to ``out_path`` (atomically).

    Args:
        base_path: the foundation checkpoint.
        tuned_path: the fine-tuned checkpoint (plain keys: LoRA merged before saving; Adapter and spatial-adapter
            checkpoints add modules and are refused).
        out_path: where to write the delta.

    Returns:
        Entry counts, delta and full-checkpoint bytes, their ratio.

    Example::

        stats = save_delta("models/model.pt", "models/finetune_dgst/model.pt", "dgst_delta.pt")
        print(f"{stats.entries_changed} entries, {stats.size_ratio:.2%} of the checkpoint")
    """
    base, _ = load_state_dict_file(base_path)
    tuned, wrapper = load_state_dict_file(tuned_path)
    delta = export_delta(base, tuned)
    delta["wrapper"] = wrapper  # rebuild the tuned file's layout
    atomic_torch_save(delta, out_path)
    return _file_stats(delta, out_path, tuned_path)


def load_and_apply(
    base_path: str | os.PathLike[str], delta_path: str | os.PathLike[str], out_path: str | os.PathLike[str]
) -> DeltaStats:
    """Rebuild the fine-tuned checkpoint from the foundation checkpoint and a delta file, written atomically.

    The output has the tuned checkpoint's layout (raw state dict or ``{"model": state_dict}``).

    Raises:
        DeltaMismatchError: ``base_path`` is not the checkpoint the delta was made against.

    Example::

        load_and_apply("models/model.pt", "dgst_delta.pt", "models/finetune_dgst/model.pt")
    """
    base, _ = load_state_dict_file(base_path)
    delta = load_delta(delta_path)
    state = apply_delta(base, delta)
    wrapper = delta.get("wrapper")
    atomic_torch_save({wrapper: state} if wrapper else state, out_path)
    return _file_stats(delta, delta_path, out_path)


def _file_stats(
    delta: Mapping[str, Any], delta_path: str | os.PathLike[str], full_path: str | os.PathLike[str]
) -> DeltaStats:
    return DeltaStats(
        **delta["stats"],
        delta_bytes=os.path.getsize(delta_path),
        full_bytes=os.path.getsize(full_path),
        base_sha256=delta["base_sha256"],
    )


# ------------------------------------------------------------------------------------------ helpers


def _tensor(state: StateDict, key: str) -> torch.Tensor:
    value = state[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor: deltas hold tensors only")
    return value


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    size = tensor.element_size()
    if size not in _BITS:
        raise TypeError(f"cannot compare tensors of dtype {tensor.dtype} bitwise")
    return tensor.view(_BITS[size])


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _alias_key(tensor: torch.Tensor, storages: dict[tuple[Any, ...], str], key: str) -> str | None:
    if tensor.numel() == 0:
        return None
    storage = tensor.untyped_storage().data_ptr()
    view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
    if view in storages:
        return storages[view]
    storages[view] = key
    return None


def _check_same_layout(base: StateDict, tuned: StateDict) -> None:
    only_base, only_tuned = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if only_base or only_tuned:
        raise ValueError(
            "base and tuned state dicts have different keys (merge LoRA into the plain network first; Adapter / spatial-adapter checkpoints add modules and have no delta): "
            f"only in base {only_base[:5]}, only in tuned {only_tuned[:5]}"
        )
    for key in tuned:
        b, t = _tensor(base, key), _tensor(tuned, key)
        if b.shape != t.shape or b.dtype != t.dtype:
            raise ValueError(f"{key}: base is {b.dtype} {tuple(b.shape)}, tuned is {t.dtype} {tuple(t.shape)}")


def _check_format(delta: Any, where: str = "delta") -> None:
    if not isinstance(delta, Mapping) or delta.get("format") != FORMAT:
        raise ValueError(f"{where} is not a dgst_monai sparse delta")
    if delta.get("version") != VERSION:
        raise ValueError(f"{where} has delta format version {delta.get('version')}, this dgst_monai reads {VERSION}")
