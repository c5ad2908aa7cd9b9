"""Helpers shared by the tests: tiny DynUNets, the loss, SGD, fixed patches, CPU trainers, bundle checks, ports.

Imported by the test modules (``from helpers import ...``; pytest puts ``tests/`` on the path) and by
``conftest.py``'s fixtures, so that each of these is written once. Bundle workflows are built with the
library's own :func:`dgst_monai.bundle.export.bundle_workflow` (re-exported here) and checked as the model zoo does
(:func:`checked`, :func:`run_checked`).

Example::

    from helpers import build_tiny_dynunet, make_loss, nnunet_sgd

    net = build_tiny_dynunet()
    optimizer = nnunet_sgd(net)
    make_loss()(net(torch.randn(1, 1, 16, 16, 16)), torch.zeros(1, 1, 16, 16, 16)).backward()
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai.bundle.export import bundle_workflow
from dgst_monai.losses import StackedDeepSupervisionLoss
from dgst_monai.networks.adapters import MergedView
from dgst_monai.networks.inference import drop_deep_supervision_heads_on_load

#: The repository root (the test modules sit one or two folders below it).
REPO = Path(__file__).resolve().parent.parent

__all__ = [
    "build_tiny_dynunet",
    "build_tiny_inference_dynunet",
    "bundle_workflow",
    "changed_by_plain_steps",
    "changed_names",
    "checked",
    "cpu_trainer",
    "decay_sgd",
    "error_chain",
    "fixed_data_trainer",
    "free_port",
    "make_loss",
    "nnunet_sgd",
    "patches",
    "run_checked",
    "run_saving_merged",
    "snapshot",
]

Params = nn.Module | Iterable[torch.Tensor]


def build_tiny_dynunet(
    filters: Iterable[int] = (4, 8, 16, 32),
    trans_bias: bool = False,
    *,
    deep_supervision: bool = True,
    norm_name: str | tuple[str, dict[str, Any]] = ("INSTANCE", {"affine": True}),
    **kwargs: Any,
) -> DynUNet:
    """A 4-level 3D DynUNet (1 -> 2 classes), by default with affine instance norm and one deep-supervision head.

    Written out with MONAI's constructor rather than taken from ``dgst_monai.networks`` so that the tests
    check the library against a network they define themselves.

    Args:
        filters: channels per level.
        trans_bias: bias in the transposed convolutions.
        deep_supervision: the extra head (off: the inference / TorchScript form of the same network).
        norm_name: MONAI's norm spec.
        **kwargs: further :class:`monai.networks.nets.DynUNet` arguments (``res_block``, ...).

    Example::

        net = build_tiny_dynunet(filters=(8, 16, 32, 64), deep_supervision=False)
    """
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        kernel_size=[3, 3, 3, 3],
        strides=[1, 2, 2, 2],
        upsample_kernel_size=[2, 2, 2],
        filters=list(filters),
        norm_name=norm_name,
        deep_supervision=deep_supervision,
        deep_supr_num=1,
        trans_bias=trans_bias,
        **kwargs,
    )


def build_tiny_inference_dynunet(**kwargs: Any) -> DynUNet:
    """The tiny DynUNet without deep supervision (the inference / export network: TorchScript scripts only that),
    which loads the deep-supervised twin's checkpoint strictly once the extra head is dropped.

    Args:
        **kwargs: :func:`build_tiny_dynunet` arguments (``res_block``, ``norm_name``, ...).

    Example::

        plain = build_tiny_inference_dynunet(res_block=True)
        plain.load_state_dict(build_tiny_dynunet(res_block=True).state_dict(), strict=True)
    """
    return drop_deep_supervision_heads_on_load(build_tiny_dynunet(deep_supervision=False, **kwargs))


def make_loss() -> nn.Module:
    """The fine-tuning loss: Dice + cross-entropy on every deep-supervision head (and on eval-mode output)."""
    return StackedDeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))


def _parameters(params: Params) -> list[torch.Tensor]:
    return list(params.parameters() if isinstance(params, nn.Module) else params)


def nnunet_sgd(params: Params, lr: float = 0.05) -> torch.optim.SGD:
    """nnU-Net's optimizer (momentum 0.99, Nesterov, weight decay 3e-5) over a module's or a list's parameters.

    Example::

        optimizer = nnunet_sgd(ddp.parameters(), lr=0.01)
    """
    return torch.optim.SGD(_parameters(params), lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)


def decay_sgd(params: Params, lr: float = 0.05) -> torch.optim.SGD:
    """SGD with momentum 0.9 and weight decay 1e-3: it moves every parameter it holds at every step, so a
    parameter that stays bit-identical was frozen (or masked), not merely given a zero gradient.

    Example::

        optimizer = decay_sgd(net)
    """
    return torch.optim.SGD(_parameters(params), lr=lr, momentum=0.9, weight_decay=1e-3)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter, by ``named_parameters()`` name.

    Example::

        before = snapshot(net)
    """
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_names(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The names whose tensors differ (in any entry) between two snapshots.

    Example::

        assert changed_names(before, snapshot(net)) == {"output_block.conv.conv.weight"}
    """
    return {n for n in before if not torch.equal(before[n], after[n])}


def changed_by_plain_steps(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> set[str]:
    """Train ``net`` in a plain loop, one step of :func:`decay_sgd` over *all* its parameters and :func:`make_loss`
    per ``(image, label)`` batch, and return the names of the parameters that changed.

    The optimizer holds the frozen parameters too, so one that stays put was frozen by the method under test.

    Example::

        assert changed_by_plain_steps(net, [(image, label)] * 2) == {"output_block.conv.conv.weight"}
    """
    optimizer, loss_fn = decay_sgd(net), make_loss()
    before = snapshot(net)
    for image, label in batches:
        optimizer.zero_grad()
        loss_fn(net(image), label).backward()
        optimizer.step()
    return changed_names(before, snapshot(net))


def patches(n: int, *, seed: int = 11, size: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed (image, label) patches of ``size``^3 voxels from their own generator: the same at every call
    with the same ``seed``, whatever the global torch seed.

    Example::

        data = patches(2, seed=1000 + rank)  # a different stream per DDP rank
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (1, size, size, size)
    return [
        {"image": torch.randn(shape, generator=gen), "label": (torch.rand(shape, generator=gen) > 0.7).float()}
        for _ in range(n)
    ]


def cpu_trainer(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: list[dict[str, torch.Tensor]],
    *,
    max_epochs: int = 1,
    loss_function: nn.Module | None = None,
    **kwargs: Any,
) -> SupervisedTrainer:
    """A real MONAI ``SupervisedTrainer`` on CPU over ``data`` in order (batch 1, no shuffling, no workers).

    Args:
        network: the network (or its DDP wrapper).
        optimizer: over the network's parameters.
        data: dicts of ``image`` and ``label`` (channel first, no batch dimension).
        max_epochs: epochs; each has ``len(data)`` iterations.
        loss_function: by default :func:`make_loss`.
        **kwargs: further ``SupervisedTrainer`` arguments (``accumulation_steps``, ...).

    Example::

        trainer = cpu_trainer(net, nnunet_sgd(net), patches(2), max_epochs=2)
        trainer.run()
    """
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=1, shuffle=False, num_workers=0),
        network=network,
        optimizer=optimizer,
        loss_function=make_loss() if loss_function is None else loss_function,
        **kwargs,
    )


def run_saving_merged(trainer: SupervisedTrainer, net: nn.Module, folder: Path) -> Path:
    """Run ``trainer`` with a ``CheckpointSaver`` of ``MergedView(net)`` writing ``folder/model.pt`` at the end,
    as the bundles' fine-tuning config saves an injected or wrapped network; the checkpoint's path.

    Example::

        state = torch.load(run_saving_merged(trainer, net, tmp_path), weights_only=True)
    """
    saver = CheckpointSaver(str(folder), {"model": MergedView(net)}, save_final=True, final_filename="model.pt")
    saver.attach(trainer)
    trainer.run()
    return Path(folder) / "model.pt"


def fixed_data_trainer(net: nn.Module, loss: nn.Module, data: list[dict], max_epochs: int) -> SupervisedTrainer:
    """A :func:`cpu_trainer` over ``data`` with nnU-Net's SGD at lr 0.01.

    Example::

        trainer = fixed_data_trainer(net, make_loss(), patches(2), max_epochs=3)
    """
    return cpu_trainer(net, nnunet_sgd(net, lr=0.01), data, max_epochs=max_epochs, loss_function=loss)


def checked(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """``workflow`` initialised, and asserted to have every property ``check_properties()`` looks for (the model
    zoo's check).

    Example::

        checked(bundle_workflow(root, ["inference"], "infer")).run()
    """
    workflow.initialize()
    missing = workflow.check_properties()
    where = f"{workflow.parser.get('bundle_root')} ({workflow.workflow_type})"
    assert not missing, f"{where}: missing or mis-referenced properties {missing}"
    return workflow


def run_checked(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """What the model zoo's CI does with a workflow: :func:`checked`, then run and finalize.

    Example::

        run_checked(bundle_workflow(root, ["train"], "train", datalist="datalist.json"))
    """
    checked(workflow).run()
    workflow.finalize()
    return workflow


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``), outermost first: what a bundle workflow's
    wrapped failure is really about is at the end.

    Example::

        assert "no input scan given" in str(error_chain(failure.value)[-1])
    """
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a torch.distributed rendezvous).

    Example::

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: inductor generates C++ and needs a compiler on the PATH (it looks for g++ / c++); without one it cannot run
requires_cxx = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler on the PATH for inductor"
)
