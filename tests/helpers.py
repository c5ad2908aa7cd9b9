"""Helpers shared by the tests: the tiny deep-supervised DynUNet, the fine-tuning loss, SGD and a free port.

Imported by the test modules (``from helpers import ...``; pytest puts ``tests/`` on the path) and by
``conftest.py``'s fixtures, so that each of these is written once.

Example::

    from helpers import build_tiny_dynunet, make_loss, nnunet_sgd

    net = build_tiny_dynunet()
    optimizer = nnunet_sgd(net)
    make_loss()(net(torch.randn(1, 1, 16, 16, 16)), torch.zeros(1, 1, 16, 16, 16)).backward()
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai.losses import StackedDeepSupervisionLoss

__all__ = ["build_tiny_dynunet", "bundle_workflow", "decay_sgd", "free_port", "make_loss", "nnunet_sgd"]

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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a torch.distributed rendezvous).

    Example::

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bundle_workflow(root: Path, configs: list[str], workflow_type: str, **overrides: Any) -> ConfigWorkflow:
    """A MONAI ``ConfigWorkflow`` over ``configs/<name>.json`` of the bundle folder ``root`` (wherever it lies:
    the repository's, a copy, an unzipped export), with its metadata and logging config.

    Example::

        workflow = bundle_workflow(tmp_path / "ln_ct_dynunet", ["train", "finetune"], "train", shots=2)
        workflow.initialize()
    """
    return ConfigWorkflow(
        config_file=[str(root / "configs" / f"{c}.json") for c in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        **overrides,
    )
