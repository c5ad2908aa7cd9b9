"""DGST under DistributedDataParallel: two CPU ranks (gloo) on different data select identical entries."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import build_tiny_dynunet, cpu_trainer, free_port, make_loss, nnunet_sgd, patches, snapshot
from ignite.engine import Events
from torch.nn.parallel import DistributedDataParallel

from dgst_monai import DGSTHandler, apply_method
from dgst_monai.sparsity import GradientSelector, SparseUpdate

WORLD_SIZE = 2
ITERATIONS = 3


def _rank_data(rank: int, n: int) -> list[dict[str, torch.Tensor]]:
    return patches(n, seed=1000 + rank)  # every rank sees different patches


def _core_loop(rank: int) -> dict:
    """GradientSelector + SparseUpdate around SGD on a DDP-wrapped network; masks of every iteration."""
    torch.manual_seed(rank)  # different initial weights too: DDP must broadcast rank 0's
    ddp = DistributedDataParallel(apply_method(build_tiny_dynunet(), "dgst"))
    optimizer = nnunet_sgd(ddp.parameters())
    selector = GradientSelector(ddp, gamma=1)
    update = SparseUpdate(dict(ddp.named_parameters()), selector.sparse, update="strict")
    loss_fn = make_loss()
    masks, losses = [], []
    for item in _rank_data(rank, ITERATIONS):
        optimizer.zero_grad()
        loss = loss_fn(ddp(item["image"][None]), item["label"][None])
        loss.backward()
        step_masks = selector()
        update.before_step(step_masks)
        optimizer.step()
        update.after_step()
        masks.append({n: step_masks[n].clone() for n in selector.sparse})
        losses.append(float(loss))
    return {
        "masks": masks,
        "losses": losses,
        "sparse": list(selector.sparse),
        "weights": snapshot(ddp.module),
    }


def _handler_run(rank: int) -> dict:
    """DGSTHandler(dgst, gamma 2, strict) on a SupervisedTrainer driving the DDP network; weights per iteration."""
    torch.manual_seed(rank)
    ddp = DistributedDataParallel(apply_method(build_tiny_dynunet(), "dgst"))
    trainer = cpu_trainer(ddp, nnunet_sgd(ddp.parameters()), _rank_data(rank, ITERATIONS))
    history = []
    for event in (Events.STARTED, Events.ITERATION_COMPLETED):
        trainer.add_event_handler(event, lambda e: history.append(snapshot(ddp.module)))
    DGSTHandler(method="dgst", gamma=2, update="strict").attach(trainer)
    trainer.run()
    return {"history": history, "fraction": trainer.state.metrics["updated_fraction"]}


def _mismatched_trainable_set_error(rank: int) -> str:
    """DGSTHandler('bias') on a network wrapped in DDP with everything trainable: the error message, or ''."""
    ddp = DistributedDataParallel(build_tiny_dynunet())
    trainer = cpu_trainer(ddp, nnunet_sgd(ddp.parameters()), _rank_data(rank, 1))
    DGSTHandler(method="bias").attach(trainer)
    try:
        trainer.run()
    except ValueError as err:
        return str(err)
    return ""


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = {
            "core": _core_loop(rank),
            "handler": _handler_run(rank),
            "error": _mismatched_trainable_set_error(rank),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    """Run the two-rank job once; return what each rank saved."""
    out_dir = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # re-raises a rank's exception
        if time.monotonic() > deadline:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail("the DDP ranks did not finish within 120 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_ddp_ranks_see_different_data(ddp_results):
    """The two ranks' losses differ at every iteration, so identical masks are not a trivial consequence of the data."""
    a, b = (r["core"]["losses"] for r in ddp_results)
    assert len(a) == len(b) == ITERATIONS
    assert all(x != y for x, y in zip(a, b))


def test_ddp_core_masks_identical_on_both_ranks(ddp_results):
    """GradientSelector on the all-reduced gradients picks the same entries on both ranks at every iteration."""
    a, b = (r["core"] for r in ddp_results)
    assert a["sparse"] == b["sparse"] and len(a["sparse"]) > 0
    assert all(name.startswith("module.") for name in a["sparse"])  # named through the DDP wrapper
    for it in range(ITERATIONS):
        assert set(a["masks"][it]) == set(a["sparse"])
        for name in a["sparse"]:
            assert torch.equal(a["masks"][it][name], b["masks"][it][name]), (it, name)
            rows = a["masks"][it][name].reshape(a["masks"][it][name].shape[0], -1)
            assert torch.equal(rows.sum(1), torch.ones(rows.shape[0], dtype=torch.long)), (it, name)
    assert any(not torch.equal(a["masks"][0][n], a["masks"][1][n]) for n in a["sparse"])


def test_ddp_core_final_weights_identical(ddp_results):
    """After the strict sparse updates, both ranks hold bit-identical weights."""
    a, b = (r["core"]["weights"] for r in ddp_results)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_ddp_handler_updates_identical_entries_and_weights(ddp_results):
    """DGSTHandler in a SupervisedTrainer on DDP: same moved entries each iteration (2 per filter), same weights."""
    a, b = (r["handler"]["history"] for r in ddp_results)
    assert len(a) == len(b) == ITERATIONS + 1
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name  # DDP broadcast rank 0's initial weights
    for it in range(1, ITERATIONS + 1):
        for name in a[it]:
            moved_a, moved_b = a[it][name] != a[it - 1][name], b[it][name] != b[it - 1][name]
            assert torch.equal(moved_a, moved_b), (it, name)
            assert torch.equal(a[it][name], b[it][name]), (it, name)
            is_kernel = a[it][name].dim() == 5 and not name.startswith(("output_block.", "deep_supervision_heads."))
            if is_kernel:
                rows = moved_a.reshape(moved_a.shape[0], -1)
                assert torch.equal(rows.sum(1), torch.full((rows.shape[0],), 2)), (it, name)
    fa, fb = (r["handler"]["fraction"] for r in ddp_results)
    assert fa == fb and 0 < fa < 1


def test_ddp_handler_refuses_a_trainable_set_changed_after_wrapping(ddp_results):
    """A method whose trainable set differs from the DDP-wrapped one raises a ValueError telling to apply it first."""
    for result in ddp_results:
        assert "apply_method" in result["error"] and "DistributedDataParallel" in result["error"]
