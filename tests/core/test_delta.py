"""Sparse deltas: bit-identical round trips, tiny deltas for strict DGST, refusal of the wrong base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import decay_sgd
from torch import nn

from dgst_monai import DGSTHandler, apply_method, get_method
from dgst_monai.delta import (
    DeltaMismatchError,
    apply_delta,
    changed_mask,
    delta_stats,
    export_delta,
    load_and_apply,
    load_delta,
    load_state_dict_file,
    save_delta,
)
from dgst_monai.sparsity import group_rows


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and not changed_mask(a, b).any()


def _assert_identical(rebuilt: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    assert list(rebuilt) == list(tuned)
    for key, value in tuned.items():
        assert rebuilt[key].dtype == value.dtype, key
        assert torch.equal(rebuilt[key], value), key


def _strict_dgst_tune(net: nn.Module, trainer_factory, steps: int) -> None:
    optimizer = decay_sgd(net)
    trainer = trainer_factory(net, optimizer, iterations=steps)
    DGSTHandler(method="dgst", gamma=1, update="strict").attach(trainer)
    trainer.run()


def _no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_random_tune_round_trip_is_bit_identical(tiny_dynunet):
    """Dense, sparse and unchanged tensors, other dtypes, -0.0 and NaN: every tensor is rebuilt bit for bit."""
    base = {k: v.clone() for k, v in tiny_dynunet().state_dict().items()}  # clones: no aliasing here
    base["extra.half"] = torch.randn(5, 7).half()
    base["extra.count"] = torch.tensor(3, dtype=torch.int64)
    base["extra.zeros"] = torch.zeros(4)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["bottleneck.conv1.conv.weight"] += torch.randn_like(tuned["bottleneck.conv1.conv.weight"])  # all entries
    tuned["input_block.conv1.conv.weight"].view(-1)[[0, 5, 17]] += 1.0  # three entries
    tuned["extra.half"][2, 3] = 7.0
    tuned["extra.count"] += 1
    tuned["extra.zeros"][1] = -0.0  # equal by value, different bits
    tuned["extra.zeros"][2] = float("nan")

    delta = export_delta(base, tuned)
    entries = delta["entries"]
    assert set(entries) == {
        "bottleneck.conv1.conv.weight", "input_block.conv1.conv.weight", "extra.half", "extra.count", "extra.zeros"
    }
    assert entries["bottleneck.conv1.conv.weight"]["indices"] is None  # stored whole: smaller than index + value
    assert entries["input_block.conv1.conv.weight"]["indices"].tolist() == [0, 5, 17]
    assert entries["input_block.conv1.conv.weight"]["indices"].dtype == torch.int32
    assert entries["extra.half"]["values"].dtype == torch.float16
    n_bottleneck = tuned["bottleneck.conv1.conv.weight"].numel()
    assert delta_stats(delta).entries_changed == n_bottleneck + 3 + 1 + 1 + 2

    rebuilt = apply_delta(base, delta)
    assert list(rebuilt) == list(tuned)
    for key in tuned:
        assert _same_bits(rebuilt[key], tuned[key]), key
        if key != "extra.zeros":  # NaN != NaN
            assert torch.equal(rebuilt[key], tuned[key]), key


def test_dynunet_aliases_are_stored_once(tiny_dynunet):
    """DynUNet's skip_layers.* duplicate its blocks in the state dict: the delta stores them once, as aliases."""
    base_net, tuned_net = tiny_dynunet(), tiny_dynunet()
    base, tuned = base_net.state_dict(), tuned_net.state_dict()  # every tensor differs
    delta = export_delta(base, tuned)
    assert delta["aliases"] and all(k.startswith("skip_layers.") for k in delta["aliases"])
    assert not any(k.startswith("skip_layers.") for k in delta["entries"])
    assert delta_stats(delta).entries_total == sum(p.numel() for p in tuned_net.parameters())
    _assert_identical(apply_delta(base, delta), tuned)


def test_strict_dgst_delta_is_tiny_and_exact(tiny_dynunet, trainer_factory, tmp_path, capsys):
    """A strict DGST tune (3 steps, gamma 1) as files: delta holds <= 3 entries per filter, rebuilds exactly."""
    steps = 3
    net = tiny_dynunet()
    base_path, tuned_path = tmp_path / "foundation.pt", tmp_path / "tuned.pt"
    torch.save(net.state_dict(), base_path)  # raw state dict (what CheckpointSaver writes for one object)
    _strict_dgst_tune(net, trainer_factory, steps)
    torch.save({"model": net.state_dict()}, tuned_path)

    stats = save_delta(base_path, tuned_path, tmp_path / "delta.pt")
    assert stats.delta_bytes == os.path.getsize(tmp_path / "delta.pt")
    assert stats.full_bytes == os.path.getsize(tuned_path)
    delta = load_delta(tmp_path / "delta.pt")
    base_state, _ = load_state_dict_file(base_path)
    for name, entry in delta["entries"].items():
        param = base_state[name]
        if param.dim() == 5 and not name.startswith(("output_block.", "deep_supervision_heads.")):
            changed = torch.zeros(param.numel(), dtype=torch.bool)
            changed[entry["indices"].long()] = True
            assert group_rows(changed.view_as(param), "filter").sum(1).max() <= steps, name
    assert stats.changed_fraction < 0.05
    assert stats.size_ratio < 0.2  # tiny network: the always-trained norms and heads dominate
    with capsys.disabled():
        print(
            f"\nstrict DGST x{steps} on the tiny DynUNet: {stats.entries_changed}/{stats.entries_total} entries, "
            f"delta {stats.delta_bytes} B / checkpoint {stats.full_bytes} B = {stats.size_ratio:.3%}"
        )

    out_path = tmp_path / "rebuilt.pt"
    load_and_apply(base_path, tmp_path / "delta.pt", out_path)
    rebuilt = torch.load(out_path, weights_only=True)
    assert set(rebuilt) == {"model"}  # the tuned file's layout
    _assert_identical(rebuilt["model"], torch.load(tuned_path, weights_only=True)["model"])
    assert _no_temp_files(tmp_path)


def test_merged_lora_tune_round_trip(tiny_dynunet, tmp_path):
    """A merged LoRA model against its foundation: same keys, exact rebuild (LoRA rewrites its convs whole)."""
    foundation = tiny_dynunet()
    net = apply_method(tiny_dynunet(), "lora")
    net.load_state_dict(foundation.state_dict())
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    merged = get_method("lora").merge(net)
    delta = export_delta(foundation.state_dict(), merged.state_dict())
    _assert_identical(apply_delta(foundation.state_dict(), delta), merged.state_dict())
    with pytest.raises(ValueError, match="merge LoRA"):
        export_delta(foundation.state_dict(), net.state_dict())  # unmerged: different keys


def test_wrong_base_is_refused(tiny_dynunet, tmp_path):
    """A delta applied to another base raises DeltaMismatchError and writes nothing."""
    base, tuned = tiny_dynunet().state_dict(), tiny_dynunet().state_dict()
    delta = export_delta(base, tuned)
    other = {k: v.clone() for k, v in base.items()}
    other["input_block.norm1.weight"][0] += 1e-3
    with pytest.raises(DeltaMismatchError, match="SHA-256"):
        apply_delta(other, delta)
    assert issubclass(DeltaMismatchError, ValueError)

    torch.save(base, tmp_path / "base.pt")
    torch.save(tuned, tmp_path / "tuned.pt")
    torch.save(other, tmp_path / "other.pt")
    save_delta(tmp_path / "base.pt", tmp_path / "tuned.pt", tmp_path / "delta.pt")
    with pytest.raises(DeltaMismatchError):
        load_and_apply(tmp_path / "other.pt", tmp_path / "delta.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists() and _no_temp_files(tmp_path)


def test_corrupt_delta_and_bad_inputs_are_explained(tiny_dynunet, tmp_path):
    base, tuned = tiny_dynunet().state_dict(), tiny_dynunet().state_dict()
    delta = export_delta(base, tuned)
    key = next(iter(delta["entries"]))
    delta["entries"][key]["values"] = delta["entries"][key]["values"] + 1
    with pytest.raises(ValueError, match="corrupt"):
        apply_delta(base, delta)
    with pytest.raises(ValueError, match="not a dgst_monai sparse delta"):
        apply_delta(base, {"weights": 1})
    reshaped = dict(tuned, **{"output_block.conv.conv.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="output_block.conv.conv.bias"):
        export_delta(base, reshaped)
    torch.save({"epoch": 3}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_state_dict_file(tmp_path / "bad.pt")


def test_writes_are_atomic(tiny_dynunet, tmp_path, monkeypatch):
    """A failure while writing leaves the previous output intact and no temporary file behind."""
    base, tuned = tiny_dynunet().state_dict(), tiny_dynunet().state_dict()
    torch.save(base, tmp_path / "base.pt")
    torch.save(tuned, tmp_path / "tuned.pt")
    out = tmp_path / "delta.pt"
    out.write_bytes(b"previous")

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_delta(tmp_path / "base.pt", tmp_path / "tuned.pt", out)
    assert out.read_bytes() == b"previous" and _no_temp_files(tmp_path)
