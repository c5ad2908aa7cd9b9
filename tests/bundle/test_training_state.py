"""TrainingStateCheckpoint on a real MONAI SupervisedTrainer: atomic saves, pruning, resume, its errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from torch import nn

from dgst_monai.handlers import TrainingStateCheckpoint, latest_training_state


class Counter:
    """A non-tensor object with a state, as a fine-tuning method's selector is: counts iterations."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def _run(
    save_dir: Path,
    max_epochs: int,
    resume: bool = False,
    stop_after: int | None = None,
    ddp: bool = False,
    **options: Any,
) -> tuple[SupervisedTrainer, nn.Module, Counter]:
    """A tiny deterministic CPU training of ``max_epochs`` epochs (2 iterations each)."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    if ddp:
        network = nn.parallel.DistributedDataParallel(network)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max_epochs, power=0.9)
    generator = torch.Generator().manual_seed(1)
    shape = (1, 8, 8, 8)
    data = [
        {"image": torch.randn(shape, generator=generator), "label": torch.randint(0, 2, shape, generator=generator)}
        for _ in range(4)
    ]
    counter = Counter()
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=2, shuffle=False),
        network=network,
        optimizer=optimizer,
        loss_function=lambda pred, label: nn.functional.cross_entropy(pred, label[:, 0].long()),
        amp=False,
    )
    TrainingStateCheckpoint(
        save_dir,
        {"model": network, "optimizer": optimizer, "lr_scheduler": scheduler, "counter": counter},
        resume=resume,
        map_location="cpu",
        **options,
    ).attach(trainer)
    # attached after the checkpoint: it must still have stepped when the state is saved
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: setattr(counter, "steps", counter.steps + 1))
    if stop_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
    trainer.run()
    return trainer, network, counter


def _states(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_saves_every_epoch_after_the_other_handlers_and_keeps_n_saved(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        _run(tmp_path, max_epochs=3, n_saved=2)
    finally:
        os.umask(old)
    assert _states(tmp_path) == ["training_state_epoch=2.pt", "training_state_epoch=3.pt"]
    path = tmp_path / "training_state_epoch=3.pt"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # what open() gives under umask 027, not 0o600 / 0o644
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "counter", "trainer", "checkpointer"}
    assert state["trainer"]["iteration"] == 6 and state["trainer"]["epoch_length"] == 2  # ignite: epoch = 6 / 2
    assert state["counter"] == {"steps": 6}
    assert state["lr_scheduler"]["last_epoch"] == 3  # the scheduler had stepped for epoch 3 already
    assert [name for _, name in state["checkpointer"]["_saved"]] == _states(tmp_path)


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    _, straight, straight_counter = _run(tmp_path / "straight", max_epochs=3)

    interrupted = tmp_path / "interrupted"
    trainer, _, _ = _run(interrupted, max_epochs=3, stop_after=1)
    assert trainer.state.epoch == 1 and _states(interrupted) == ["training_state_epoch=1.pt"]
    trainer, resumed, counter = _run(interrupted, max_epochs=3, resume=True)

    assert (trainer.state.epoch, trainer.state.iteration) == (3, 6)  # epoch 1 was not trained again
    assert counter.steps == straight_counter.steps == 6  # the extra object was restored, then continued
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert _states(interrupted) == ["training_state_epoch=3.pt"]  # the resumed run's epoch-1 file was pruned


def test_resume_without_state_and_bad_arguments_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no training state"):
        _run(tmp_path / "empty", max_epochs=1, resume=True)
    with pytest.raises(ValueError, match=r"\['scaler', 'trainer'\]"):
        TrainingStateCheckpoint(tmp_path, {"trainer": 1, "scaler": 2})
    with pytest.raises(ValueError, match="interval"):
        TrainingStateCheckpoint(tmp_path, {}, interval=0)
    with pytest.raises(ValueError, match="n_saved"):
        TrainingStateCheckpoint(tmp_path, {}, n_saved=True)


def test_latest_training_state_orders_epochs_as_numbers(tmp_path: Path) -> None:
    assert latest_training_state(tmp_path / "missing") is None
    for name in ("training_state_epoch=9.pt", "training_state_epoch=10.pt", "other_epoch=99.pt",
                 "training_state_epoch=11.pt.tmp", ".training_state_epoch=12.pt.abc.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert latest_training_state(tmp_path) == tmp_path / "training_state_epoch=10.pt"
    assert latest_training_state(tmp_path, prefix="other") == tmp_path / "other_epoch=99.pt"


def _ddp_rank(rank: int, port: int, root: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _run(root / f"rank{rank}", max_epochs=2, stop_after=1, ddp=True)  # each rank names its own folder
        dist.barrier()
        trainer, network, counter = _run(root / "rank0", max_epochs=2, resume=True, ddp=True)  # both resume
        # the ranks' weights are compared by the test, not gathered here: a collective on tensors Python holds, as
        # the last thing a rank does, can abort its exit (gloo's thread frees them after the interpreter stopped)
        weights = torch.cat([p.detach().reshape(-1) for p in network.parameters()])
        torch.save({"iteration": trainer.state.iteration, "steps": counter.steps, "weights": weights},
                   root / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_ddp_rank_0_writes_and_every_rank_resumes(tmp_path: Path) -> None:
    # spawned, not forked: a fork inherits the parent's autograd state, and after some earlier tests in the same
    # process (ones that start autograd's device threads) backward() in a forked child refuses to run
    mp.start_processes(_ddp_rank, args=(free_port(), tmp_path), nprocs=2, join=True, start_method="spawn")
    assert not (tmp_path / "rank1").exists()  # rank 1 neither created its folder nor wrote
    assert _states(tmp_path / "rank0") == ["training_state_epoch=2.pt"]
    state = torch.load(tmp_path / "rank0" / "training_state_epoch=2.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state["model"])  # the DDP model is saved unwrapped
    results = [torch.load(tmp_path / f"result{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [(r["iteration"], r["steps"]) for r in results] == [(4, 4), (4, 4)]
    assert torch.equal(results[0]["weights"], results[1]["weights"])  # both resumed from rank 0's state in step
