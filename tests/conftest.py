"""Shared fixtures for the DGST core tests: a tiny deep-supervised DynUNet, random patches, a MONAI trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from bundle_support import save_tiny_checkpoint
from helpers import build_tiny_dynunet, cpu_trainer, make_loss, snapshot
from monai.engines import SupervisedTrainer
from monai.networks.nets import DynUNet
from torch import nn

#: Prefixes of the tiny DynUNet's children, written out here so the tests do not reuse the library's layout.
ENCODER_PREFIXES = ("input_block.", "downsamples.", "bottleneck.")
DECODER_PREFIXES = ("upsamples.", "output_block.", "deep_supervision_heads.")
HEAD_PREFIXES = ("output_block.", "deep_supervision_heads.")

PATCH = 16


@pytest.fixture(autouse=True)
def fixed_seed() -> None:
    """Every test starts from the same torch seed and a single thread (the machine's 2 cores are shared)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_dynunet() -> Callable[..., DynUNet]:
    """Factory of tiny DynUNets (filters 4-8-16-32, deep supervision with one extra head)."""
    return build_tiny_dynunet


def random_batch(batch: int = 2, size: int = PATCH, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image and a random two-class label map, both (batch, 1, size, size, size)."""
    image = torch.randn(batch, 1, size, size, size, dtype=dtype)
    label = (torch.rand(batch, 1, size, size, size) > 0.7).to(dtype)
    return image, label


@pytest.fixture
def batch_factory() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Factory of random (image, label) batches."""
    return random_batch


@pytest.fixture
def loss_factory() -> Callable[[], nn.Module]:
    """Factory of the deep-supervision Dice-CE loss."""
    return make_loss


def make_trainer(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int = 2,
    max_epochs: int = 1,
    dtype=torch.float32,
    **kwargs,
) -> SupervisedTrainer:
    """A real ``SupervisedTrainer`` on ``iterations`` random patches per epoch, batch 1, CPU."""
    items = []
    for _ in range(iterations):
        image, label = random_batch(1, PATCH, dtype)
        items.append({"image": image[0], "label": label[0]})
    return cpu_trainer(network, optimizer, items, max_epochs=max_epochs, **kwargs)


@pytest.fixture
def trainer_factory() -> Callable[..., SupervisedTrainer]:
    """Factory of MONAI ``SupervisedTrainer``s on tiny random data."""
    return make_trainer


@pytest.fixture
def take_snapshot() -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """Function that copies all parameters of a model."""
    return snapshot


def reference_top_gamma(grad: torch.Tensor, gamma: int, grouping: str) -> torch.Tensor:
    """Slow, obviously correct DGST mask: per row, the ``gamma`` largest |g| by a stable descending argsort."""
    if grouping == "filter":
        rows = grad.reshape(grad.shape[0], -1)
    elif grouping == "kernel":
        rows = grad.reshape(-1, math.prod(grad.shape[2:]))  # a Linear or 1x1x1 weight: one entry per row
    else:
        raise AssertionError(grouping)
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    for r in range(rows.shape[0]):
        keep = torch.argsort(rows[r].abs(), descending=True, stable=True)[:gamma]
        mask[r, keep] = True
    return mask.reshape(grad.shape)


@pytest.fixture
def reference_mask() -> Callable[[torch.Tensor, int, str], torch.Tensor]:
    """The reference top-gamma selection, written independently of the library."""
    return reference_top_gamma


def is_dynunet_kernel(name: str, param: torch.Tensor) -> bool:
    """A conv / transposed-conv weight outside the heads of the tiny DynUNet (what DGST sparsifies)."""
    return name.endswith(".weight") and param.dim() == 5 and not name.startswith(HEAD_PREFIXES)


def is_dynunet_norm(name: str) -> bool:
    """An instance-norm affine parameter of the tiny DynUNet (its norms are called norm1 / norm2)."""
    return ".norm" in name


def is_dynunet_bias(name: str) -> bool:
    """A conv / transposed-conv bias of the tiny DynUNet (not a norm shift)."""
    return name.endswith(".bias") and not is_dynunet_norm(name)


@pytest.fixture
def dynunet_roles() -> SimpleNamespace:
    """The tiny DynUNet's parameter roles from its parameter names, independent of dgst_monai.roles."""
    return SimpleNamespace(
        encoder=ENCODER_PREFIXES,
        decoder=DECODER_PREFIXES,
        heads=HEAD_PREFIXES,
        is_kernel=is_dynunet_kernel,
        is_norm=is_dynunet_norm,
        is_bias=is_dynunet_bias,
    )


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> SimpleNamespace:
    """Tiny synthetic CT datasets (64 x 64 x 32 mm, 3 cases each: 2 training, 1 test): ``hn`` and
    ``mediastinum`` datalist paths, shared by the bundle tests of the session."""
    from dgst_monai.data import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_ct")
    knobs = {"fov_mm": (64.0, 64.0, 32.0), "n_nodes": (2, 4)}
    return SimpleNamespace(
        hn=str(write_synthetic_dataset(root / "hn", "hn", n=3, seed=0, **knobs)),
        mediastinum=str(write_synthetic_dataset(root / "mediastinum", "mediastinum", n=3, seed=1, **knobs)),
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny DynUNet training checkpoint with its normalisation file."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model"), {"a_min": -100.0, "a_max": 200.0, "b_min": -2.0,
                                                                    "b_max": 4.0})
