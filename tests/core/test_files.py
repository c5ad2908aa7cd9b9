"""dgst_monai.files: atomic writes with the permissions open() gives, and the writers built on them."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dgst_monai.data.phantoms import write_synthetic_dataset
from dgst_monai.data.splits import make_splits
from dgst_monai.delta import save_delta
from dgst_monai.files import atomic_open, atomic_torch_save, atomic_write, atomic_write_json
from dgst_monai.normalization import save_normalization

SMALL = {"fov_mm": (64.0, 64.0, 16.0), "n_nodes": (2, 3)}


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _plain_mode(folder: Path) -> int:
    """The mode a plain open(..., "w") gives a new file here, under the current umask."""
    reference = folder / "reference_open.txt"
    with open(reference, "w", encoding="utf-8") as f:
        f.write("x")
    mode = _mode(reference)
    reference.unlink()
    return mode


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_new_files_get_the_mode_open_gives(tmp_path: Path, umask: int) -> None:
    expected = _plain_mode(tmp_path)
    assert expected == 0o666 & ~umask
    text = atomic_write(tmp_path / "a" / "notes.txt", "hello\n")  # missing folders are created
    raw = atomic_write(tmp_path / "raw.bin", b"\x00\x01")
    data = atomic_write_json(tmp_path / "data.json", {"x": [1, 2]})
    model = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "model.pt")
    assert [_mode(p) for p in (text, raw, data, model)] == [expected] * 4
    assert text.read_text(encoding="utf-8") == "hello\n" and raw.read_bytes() == b"\x00\x01"
    assert json.loads(data.read_text(encoding="utf-8")) == {"x": [1, 2]} and data.read_text(encoding="utf-8").endswith("\n")
    assert torch.equal(torch.load(model, weights_only=True)["w"], torch.arange(3))
    assert _leftovers(tmp_path) == []


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("{}", encoding="utf-8")
    target.chmod(0o640)
    atomic_write_json(target, {"n_cases": 2})
    assert _mode(target) == 0o640 and json.loads(target.read_text(encoding="utf-8")) == {"n_cases": 2}


def test_an_error_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "table.csv"
    target.write_text("old\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target, newline="") as f:
        f.write("half a ta")
        raise RuntimeError("boom")
    assert target.read_text(encoding="utf-8") == "old\n" and _leftovers(tmp_path) == []

    with pytest.raises(TypeError):  # a tensor cannot be JSON: refused before any file is touched
        atomic_write_json(target, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="Out of range"):
        atomic_write_json(target, {"x": float("nan")}, allow_nan=False)
    new = tmp_path / "never.json"
    with pytest.raises(ValueError):
        atomic_write_json(new, {"x": float("inf")}, allow_nan=False)
    assert target.read_text(encoding="utf-8") == "old\n" and not new.exists() and _leftovers(tmp_path) == []


def test_failing_torch_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_text_mode_only_whole_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_open(tmp_path / "x", "a"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_every_writer_honours_the_umask(tmp_path: Path, umask: int) -> None:
    """Datalists, splits, phantoms, normalization and deltas are all written with open()'s permissions."""
    expected = _plain_mode(tmp_path)
    datalist = write_synthetic_dataset(tmp_path / "synth", "hn", n=3, seed=0, **SMALL)
    splits = tmp_path / "splits" / "splits.json"
    make_splits(datalist, shots=[1], seeds=[0], output=splits, intensity="copy")
    norm = Path(save_normalization(tmp_path / "models", {"a_min": -1.0, "a_max": 1.0, "b_min": 0.0, "b_max": 1.0}))
    torch.save({"w": torch.zeros(4)}, tmp_path / "base.pt")
    torch.save({"w": torch.tensor([0.0, 1.0, 0.0, 0.0])}, tmp_path / "tuned.pt")
    save_delta(tmp_path / "base.pt", tmp_path / "tuned.pt", tmp_path / "delta.pt")
    written = [datalist, splits, norm, tmp_path / "delta.pt", *sorted((tmp_path / "synth").rglob("*.nii.gz"))]
    assert len(written) == 4 + 6
    assert {str(p.relative_to(tmp_path)): _mode(p) for p in written} == {
        str(p.relative_to(tmp_path)): expected for p in written
    }
    assert _leftovers(tmp_path) == []
