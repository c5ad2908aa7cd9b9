"""Atomic checkpoints on a real MONAI SupervisedTrainer: a failed save never costs the previous training state
(ignite removes the old file before it writes the new one; AtomicDiskSaver waits), the final model is written
atomically and only when the run completes, leftovers of interrupted writes are cleaned, the random streams are
saved and restored, and loading keeps the network's parameter objects (the optimizer stays bound to them)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, RandAffined, RandFlipd, RandGaussianNoised
from torch import nn

from dgst_monai.files import atomic_torch_save, remove_interrupted_writes
from dgst_monai.handlers import TrainingStateCheckpoint, latest_training_state
from dgst_monai.handlers.checkpoint_loader import load_checkpoint
from dgst_monai.handlers.final_checkpoint import FinalModelSaver
from dgst_monai.handlers.random_state import RandomState


class FailsAtEpoch:
    """A saved object whose state cannot be pickled at one epoch: the save of that epoch fails midway."""

    def __init__(self, trainer_epoch: list[int], epoch: int) -> None:
        self.trainer_epoch, self.epoch = trainer_epoch, epoch

    def state_dict(self) -> dict[str, Any]:
        return {"x": (lambda: 0) if self.trainer_epoch[0] == self.epoch else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _trainer(max_epochs: int, epoch_length: int | None = None, batch_size: int = 2, transform: Any = None) -> SupervisedTrainer:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    generator = torch.Generator().manual_seed(1)
    data = [
        {"image": torch.randn(1, 8, 8, 8, generator=generator), "label": torch.randint(0, 2, (1, 8, 8, 8), generator=generator)}
        for _ in range(4)
    ]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        epoch_length=epoch_length,
        train_data_loader=DataLoader(Dataset(data, transform), batch_size=batch_size, shuffle=True),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9),
        loss_function=lambda pred, label: nn.functional.cross_entropy(pred, label[:, 0].long()),
        amp=False,
    )


def test_a_failed_save_keeps_the_previous_state_and_leaves_no_temporary(tmp_path: Path) -> None:
    trainer = _trainer(max_epochs=3)
    epoch = [0]
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epoch.__setitem__(0, e.state.epoch))
    TrainingStateCheckpoint(tmp_path, {"model": trainer.network, "flaky": FailsAtEpoch(epoch, 2)}).attach(trainer)
    with pytest.raises(Exception, match="lambda|pickle"):
        trainer.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state_epoch=1.pt"]
    assert torch.load(tmp_path / "training_state_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2


def test_older_states_go_only_after_the_new_one_is_written(tmp_path: Path) -> None:
    trainer = _trainer(max_epochs=3)
    seen: list[list[str]] = []
    original = atomic_torch_save

    def watching(obj: Any, path: Any) -> Path:  # what the folder holds while each state is being written
        seen.append(sorted(p.name for p in tmp_path.glob("training_state_*.pt")))
        return original(obj, path)

    import dgst_monai.handlers.training_state as module

    module.atomic_torch_save, saved = watching, module.atomic_torch_save
    try:
        TrainingStateCheckpoint(tmp_path, {"model": trainer.network}).attach(trainer)
        trainer.run()
    finally:
        module.atomic_torch_save = saved
    assert seen == [[], ["training_state_epoch=1.pt"], ["training_state_epoch=2.pt"]]
    assert latest_training_state(tmp_path).name == "training_state_epoch=3.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_state_epoch=3.pt"]


def test_final_model_is_written_on_completion_only(tmp_path: Path) -> None:
    trainer = _trainer(max_epochs=1)
    FinalModelSaver(tmp_path, {"model": trainer.network}).attach(trainer)
    previous = tmp_path / "model.pt"
    torch.save({"old": torch.zeros(1)}, previous)
    before = previous.read_bytes()

    def crash(engine: Any) -> None:
        raise RuntimeError("out of memory")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=2), crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.run()
    assert previous.read_bytes() == before  # a crashed run writes no "final" model (MONAI's saver would)

    (tmp_path / ".model.pt.0123456789ab.tmp").write_bytes(b"half a model")  # left by a killed save
    trainer = _trainer(max_epochs=1)
    FinalModelSaver(tmp_path, {"model": trainer.network}).attach(trainer)
    trainer.run()
    state = torch.load(previous, weights_only=True)
    assert list(state) == list(trainer.network.state_dict())  # flat, as MONAI's CheckpointSaver writes one object
    assert all(torch.equal(v, trainer.network.state_dict()[k]) for k, v in state.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_remove_interrupted_writes_only_takes_temporaries_of_the_name(tmp_path: Path) -> None:
    names = [".model.pt.0123456789ab.tmp", ".model.pt.xyz.tmp", ".other.pt.0123456789ab.tmp", "model.pt", "notes.tmp"]
    for name in names:
        (tmp_path / name).write_text("x", encoding="utf-8")
    assert [p.name for p in remove_interrupted_writes(tmp_path, "model.pt")] == [".model.pt.0123456789ab.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_loading_keeps_the_parameter_objects(tmp_path: Path) -> None:
    """torch records ``assign`` in a state dict's shared metadata: the pre-load check must not leak it, or the
    real load would replace the parameters and the optimizer would update tensors the network no longer has."""
    trainer = _trainer(max_epochs=1)
    network = trainer.network
    torch.save({"model": network.state_dict()}, tmp_path / "state.pt")
    ids = [id(p) for p in network.parameters()]
    load_checkpoint(tmp_path / "state.pt", {"model": network})
    load_checkpoint(tmp_path / "state.pt", {"model": network})
    assert [id(p) for p in network.parameters()] == ids


AUGMENT = Compose(
    [
        RandAffined("image", prob=0.5, rotate_range=0.3),
        RandGaussianNoised("image", prob=0.5),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
    ]
)


def test_random_state_replays_an_epoch_of_the_loader_and_the_global_streams() -> None:
    trainer = _trainer(max_epochs=1, transform=AUGMENT)
    loader = trainer.data_loader
    state = RandomState([loader])

    def draw() -> list[Any]:
        return [b["image"].clone() for b in loader] + [torch.rand(3), np.random.rand(3), random.random()]

    draw()
    saved = state.state_dict()
    expected = draw()
    draw()  # the streams move on
    state.load_state_dict(torch.load(_roundtrip(saved), weights_only=True))
    again = draw()
    for a, b in zip(expected[:-3], again[:-3]):
        assert torch.equal(a, b)
    assert torch.equal(expected[-3], again[-3]) and np.array_equal(expected[-2], again[-2]) and expected[-1] == again[-1]
    assert saved["transforms"] == ["Compose", "RandAffined", "RandAffine", "RandAffineGrid", "RandGaussianNoised",
                                   "RandGaussianNoise", "RandFlipd"]  # fmt: skip


def _roundtrip(state: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_random_state_refuses_another_pipeline() -> None:
    saved = RandomState([_trainer(1, transform=AUGMENT).data_loader]).state_dict()
    other = RandomState([_trainer(1, transform=Compose([RandFlipd("image", prob=0.5)])).data_loader])
    with pytest.raises(ValueError, match=r"randomizable transforms \['Compose', 'RandAffined'.*this run has \['Compose', 'RandFlipd'\]"):
        other.load_state_dict(saved)


def test_an_epoch_ending_inside_a_data_pass_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """4 cases of batch 1 and 3 iterations per epoch: a resumed run would start a new pass (not bit-identical)."""
    trainer = _trainer(max_epochs=1, epoch_length=3, batch_size=1)
    TrainingStateCheckpoint(tmp_path, {"model": trainer.network, "random": RandomState([trainer.data_loader])}, name="ts").attach(trainer)
    with caplog.at_level(logging.WARNING, logger="ts"):
        trainer.run()
    assert "an epoch of 3 iterations ends inside a pass over the data (4 batches per pass)" in caplog.text
