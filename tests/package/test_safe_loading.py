"""Safe loading: every checkpoint, training state and delta loads weights only; a file carrying a pickled
payload is refused naming the file (the payload never runs); a checkpoint whose keys or shapes do not fit the
network is refused with the list of those keys, before any weight is copied, unless partial loading is asked for."""

from __future__ import annotations

import ast
import builtins
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_copies import copy_bundle, make_workflow
from helpers import REPO
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

from dgst_monai import delta
from dgst_monai.files import DamagedFileError, UnsafeFileError, load_torch_file
from dgst_monai.handlers import TrainingStateCheckpoint
from dgst_monai.handlers.checkpoint_loader import CheckpointMismatchError, SafeCheckpointLoader, load_checkpoint
from dgst_monai.networks import plan_preset
from dgst_monai.networks.checkpoints import checkpoint_state, for_checkpoint

PACKAGE = REPO / "dgst_monai"
#: The one documented exception: nnU-Net's own checkpoints pickle numpy scalars and dicts; the import trusts the
#: user's nnU-Net folder as nnU-Net itself does (dgst_monai/networks/nnunet_import.py).
WEIGHTS_ONLY_EXCEPTIONS = {"networks/nnunet_import.py"}


class Payload:
    """Unpickling this creates a file: what an attacker's ``__reduce__`` would do (here harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (builtins.open, (str(self.marker), "w"))


def _network(out_channels: int = 2, deep_supervision: bool = False) -> torch.nn.Module:
    return plan_preset("tiny").network(in_channels=1, out_channels=out_channels, deep_supervision=deep_supervision)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.fixture
def malicious(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint with a real network state and a payload beside it, proven to run on a plain torch.load."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "training_state_epoch=1.pt"
    network = _network()
    torch.save({"model": network.state_dict(), "extra": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_a_pickled_payload_is_refused_by_every_loader_and_never_runs(malicious: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = malicious
    network = _network()
    loaders = {
        "load_torch_file": lambda: load_torch_file(path),
        "load_checkpoint": lambda: load_checkpoint(path, {"model": network}),
        "SafeCheckpointLoader": lambda: SafeCheckpointLoader(path, {"model": network})(Engine(lambda e, b: None)),
        "checkpoint_state": lambda: checkpoint_state(path),
        "for_checkpoint": lambda: for_checkpoint(_network(), path),
        "load_state_dict_file": lambda: delta.load_state_dict_file(path),
        "load_delta": lambda: delta.load_delta(path),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeFileError, match=rf"{path}.* refused: it carries pickled Python objects") as info:
            load()
        assert "GLOBAL io.open" in str(info.value), name  # torch's reason: the global it refused (builtins.open)
    # resuming from it: the training-state handler refuses it as well
    trainer = Engine(lambda engine, batch: None)
    TrainingStateCheckpoint(tmp_path, {"model": network}, resume=True).attach(trainer)
    with pytest.raises(UnsafeFileError, match=str(path)):
        trainer.run([0], max_epochs=1)
    # MONAI's own loader refuses it too (weights only), though its message does not name the file
    with pytest.raises(Exception, match="Weights only load failed"):
        CheckpointLoader(str(path), {"model": network})(Engine(lambda e, b: None))
    assert not marker.exists()


def test_truncated_and_missing_checkpoints_are_named(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_network().state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DamagedFileError, match=rf"{path} cannot be read as a PyTorch file .*central directory"):
        load_checkpoint(path, {"model": _network()})
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*absent\.pt does not exist"):
        load_checkpoint(tmp_path / "absent.pt", {"model": _network()})


def test_other_shapes_are_refused_with_every_key_before_anything_is_copied(tmp_path: Path) -> None:
    path = tmp_path / "three_classes.pt"
    torch.save(_network(out_channels=3).state_dict(), path)
    network = _network(out_channels=2)
    before = _snapshot(network)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path, {"model": network})
    error = info.value
    assert set(error.mismatched) == {"output_block.conv.conv.weight", "output_block.conv.conv.bias"}
    assert error.mismatched["output_block.conv.conv.bias"] == ((3,), (2,))
    text = str(error)
    assert str(path) in text and "partial=True" in text
    assert "other shape: output_block.conv.conv.weight (checkpoint [3, 8, 1, 1, 1], network [2, 8, 1, 1, 1])" in text
    assert _unchanged(network, before)  # refused before any weight was copied


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = _network().state_dict()
    removed = "input_block.conv1.conv.weight"
    state.pop(removed)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pt"
    torch.save({"model": state}, path)
    network = _network()
    before = _snapshot(network)
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)missing from the checkpoint: {removed}.*not in the network: extra\.weight"):
        load_checkpoint(path, {"model": network})
    assert _unchanged(network, before)


def test_hooks_count_a_deep_supervised_checkpoint_loads_into_the_inference_network(tmp_path: Path) -> None:
    """The check is torch's own load on a weightless copy: the inference network's hook that drops the
    deep-supervision heads applies, so a training checkpoint fits it (no false refusal)."""
    trained = _network(deep_supervision=True)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    inference = _network(deep_supervision=False)
    load_checkpoint(path, {"model": inference})
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in inference.state_dict().items())


def test_partial_loading_only_when_asked_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _network(out_channels=3)
    path = tmp_path / "three_classes.pt"
    torch.save(source.state_dict(), path)
    network = _network(out_channels=2)
    head = network.state_dict()["output_block.conv.conv.weight"].clone()
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, {"model": network}, partial=True, logger=logging.getLogger("partial"))
    loaded = network.state_dict()
    assert torch.equal(loaded["output_block.conv.conv.weight"], head)  # left as it was
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith("output_block"))
    assert "skipped from the checkpoint: ['output_block.conv.conv.weight', 'output_block.conv.conv.bias']" in caplog.text
    with pytest.raises(ValueError, match="partial loading is for networks only"):
        load_checkpoint(path, {"model": network, "optimizer": torch.optim.SGD(network.parameters(), lr=0.1)}, partial=True)


def test_monai_strict_shape_false_drops_mismatches_silently(tmp_path: Path) -> None:
    """Why ``partial`` is explicit and logged: MONAI's ``strict_shape=False`` loads the rest without a word."""
    path = tmp_path / "three_classes.pt"
    torch.save(_network(out_channels=3).state_dict(), path)
    network = _network(out_channels=2)
    head = network.state_dict()["output_block.conv.conv.weight"].clone()
    with pytest.warns(UserWarning, match="strict_shape"):  # only about its own arguments, not the dropped keys
        CheckpointLoader(str(path), {"model": network}, strict_shape=False)(Engine(lambda e, b: None))
    assert torch.equal(network.state_dict()["output_block.conv.conv.weight"], head)


def test_finetune_bundle_refuses_a_foundation_of_another_network(tiny_ct: Any, tmp_path: Path) -> None:
    """The fine-tuning config's foundation loader (pending overlay: SafeCheckpointLoader) stops the run when it
    starts, naming the file and the keys, before any training."""
    foundation = tmp_path / "foundation.pt"
    torch.save(_network(out_channels=3, deep_supervision=True).state_dict(), foundation)
    root = copy_bundle(tmp_path)
    workflow = make_workflow(
        root,
        ["train", "finetune"],
        datalist=tiny_ct.mediastinum,
        ckpt_dir=str(tmp_path / "tuned"),
        foundation_checkpoint=str(foundation),
        normalization="shots",
        shots=2,
    )
    workflow.initialize()
    with pytest.raises(RuntimeError, match="Failed to evaluate") as info:  # MONAI's wrapping of the run expression
        workflow.run()
    error = info.value.__cause__
    assert isinstance(error, CheckpointMismatchError)
    assert f"{foundation} does not fit 'model'" in str(error) and "output_block.conv.conv.weight" in error.mismatched
    assert workflow.parser.get_parsed_content("train#trainer").state.iteration == 0


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    """Source check: each ``torch.load(...)`` call passes ``weights_only=True`` (but the documented exception)."""
    unsafe = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {k.arg: k.value for k in node.keywords}
                safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True
                if not safe and relative not in WEIGHTS_ONLY_EXCEPTIONS:
                    unsafe.append(f"{relative}:{node.lineno}")
    assert unsafe == []
