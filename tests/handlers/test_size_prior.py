"""The transductive size prior: what it measures (support labels, uniform crops of unlabeled volumes), its
penalty, which volumes it reads, and that it pulls an over-segmenting foundation's adapter toward the target."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import build_tiny_dynunet, cpu_trainer, decay_sgd
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines.utils import IterationEvents
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Spacingd

from dgst_monai import DGSTHandler, apply_method
from dgst_monai.data.unlabeled import images_only, unlabeled_cases
from dgst_monai.handlers.size_prior import SizePriorHandler, crop_at, size_penalty, support_fraction, uniform_crops

PATCH = (16, 16, 16)
TARGET = 0.05


def test_every_crop_position_together_sees_the_volume_fraction():
    """Over all crop positions uniform_crops draws from, the valid voxels cover the volume uniformly: the
    pooled mean equals the volume mean exactly, and each crop holds the volume's values where it is valid."""
    torch.manual_seed(0)
    volume = torch.rand(1, 5, 4, 3)
    patch = (3, 2, 2)
    total, count = torch.zeros(()), torch.zeros(())
    coverage = torch.zeros(5, 4, 3)
    for starts in itertools.product(*(range(-(p - 1), d) for d, p in zip(volume.shape[1:], patch))):
        crop, inside = crop_at(volume, starts, patch)
        total += (crop * inside).sum()
        count += inside.sum()
        padded = torch.zeros(1, 5 + 4, 4 + 2, 3 + 2)  # the volume at offset (p - 1) in a padded frame
        padded[0, 2:7, 1:5, 1:4] = volume[0]
        frame = padded[:, starts[0] + 2 : starts[0] + 5, starts[1] + 1 : starts[1] + 3, starts[2] + 1 : starts[2] + 3]
        assert torch.equal(crop, frame)  # zero outside the volume, the volume's values inside
        covered = torch.zeros(1, 9, 6, 5)
        covered[:, starts[0] + 2 : starts[0] + 5, starts[1] + 1 : starts[1] + 3, starts[2] + 1 : starts[2] + 3] = inside
        coverage += covered[0, 2:7, 1:5, 1:4]
    assert torch.equal(coverage, torch.full_like(coverage, 3 * 2 * 2))  # every voxel in exactly prod(patch) crops
    assert torch.allclose(total / count, volume.mean())

    crops, valid = uniform_crops(volume, patch, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 1, 3, 2, 2) and valid.shape == (4, 1, 3, 2, 2)
    assert set(valid.unique().tolist()) <= {0.0, 1.0}


def test_penalty_follows_fsefts_definition():
    """weight * (|e| - margin) outside the margin, e = (target - predicted) / max(target, predicted)."""
    over = torch.tensor(0.2, requires_grad=True)
    penalty = size_penalty(over, 0.1)  # e = -0.5
    penalty.backward()
    assert torch.isclose(penalty, torch.tensor(0.1 * (0.5 - 0.3)))
    assert torch.isclose(over.grad, torch.tensor(0.1 / 0.2))  # constant denominator: shrinking p lowers it
    assert size_penalty(torch.tensor(0.05), 0.1) == pytest.approx(0.1 * (0.5 - 0.3))  # e = +0.5
    assert size_penalty(torch.tensor(0.12), 0.1) == 0  # |e| = 0.167 < 0.3
    assert size_penalty(torch.tensor(0.2), 0.1, weight=1.0, margin=0.0) == pytest.approx(0.5)


def test_support_fraction_reads_the_whole_label_volumes(tmp_path):
    """Foreground (any label > 0) over voxels of each support label file, averaged over the shots."""
    cases = []
    for i, fraction in enumerate((0.1, 0.3)):
        label = np.zeros((10, 10, 10), dtype=np.uint8)
        label.reshape(-1)[: int(fraction * 1000)] = 1 + i  # a second class counts as foreground too
        path = tmp_path / f"case{i}_label.nii.gz"
        nib.save(nib.Nifti1Image(label, np.eye(4)), path)
        cases.append({"case_id": f"case{i}", "image": "unused", "label": str(path)})
    assert support_fraction(cases) == pytest.approx(0.2)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4)), empty)
    with pytest.raises(ValueError, match="no foreground"):
        support_fraction([{"label": str(empty)}])
    with pytest.raises(ValueError, match="has no 'label'"):
        support_fraction([{"case_id": "x", "image": "a.nii.gz"}])


def test_unlabeled_cases_are_the_other_training_cases_without_labels():
    cases = [{"case_id": f"c{i}", "image": f"c{i}.nii.gz", "label": f"c{i}_seg.nii.gz"} for i in range(4)]
    shots = [cases[2], cases[0]]
    assert unlabeled_cases(cases, shots) == [
        {"case_id": "c1", "image": "c1.nii.gz"},
        {"case_id": "c3", "image": "c3.nii.gz"},
    ]
    assert all("label" in case for case in cases)  # the datalist entries themselves are not modified
    with pytest.raises(ValueError, match="no unlabeled"):
        unlabeled_cases(cases, cases)
    with pytest.raises(ValueError, match="not among"):
        unlabeled_cases(cases[:2], [cases[3]])


def test_images_only_runs_the_training_preprocessing_on_unlabeled_entries(tmp_path):
    """The training pipeline (image + label keys) made images_only processes an entry without a label as it
    processes the image of a labelled one; the original pipeline is left as it was."""
    image = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image((image > 1).astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "seg.nii.gz")
    keys = ["image", "label"]
    training = Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode=["bilinear", "nearest"]),
            EnsureTyped(keys, dtype=[torch.float32, torch.uint8]),
        ]
    )
    labelled = training({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "seg.nii.gz")})
    unlabeled = images_only(training)({"case_id": "img", "image": str(tmp_path / "img.nii.gz")})
    assert set(unlabeled) == {"case_id", "image"} and torch.equal(unlabeled["image"], labelled["image"])
    with pytest.raises(RuntimeError):
        training({"image": str(tmp_path / "img.nii.gz")})  # the training pipeline still requires its label


def _over_segmenting_run(prior: bool, warmup: int = 0, steps: int = 6) -> tuple[torch.nn.Module, torch.Tensor, float]:
    """A foundation biased to foreground (it over-segments), adapted by spatial_adapter on labelled patches
    that are all lymph node, with or without the size prior on one unlabeled volume; returns the network, its
    adapter's last weight and its predicted foreground fraction on that volume."""
    torch.manual_seed(0)
    foundation = build_tiny_dynunet()
    with torch.no_grad():
        foundation.output_block.conv.conv.bias.copy_(torch.tensor([-1.0, 1.0]))
    net = apply_method(foundation, "spatial_adapter")
    volume = torch.randn(1, 24, 24, 24)
    unlabeled = DataLoader([{"image": volume}], batch_size=1)
    labelled = [{"image": torch.randn(1, *PATCH), "label": torch.ones(1, *PATCH)} for _ in range(steps)]
    trainer = cpu_trainer(net, decay_sgd(net, lr=0.01), labelled)
    if prior:
        SizePriorHandler(unlabeled, TARGET, PATCH, warmup_iterations=warmup).attach(trainer)
    DGSTHandler(method="spatial_adapter").attach(trainer)
    trainer.run()
    with torch.no_grad():
        padded = torch.nn.functional.pad(volume, (4, 4) * 3)[None]  # 32^3: divisible by the network's strides
        probabilities = torch.softmax(net.eval()(padded)[..., 4:-4, 4:-4, 4:-4], dim=1)
    return net, net.spatial_adapter.conv2.weight.detach().clone(), float(1 - probabilities[:, 0].mean())


def test_size_prior_pulls_an_over_segmenting_adapter_toward_the_target():
    """With the prior (lambda 0.1, margin 0.3) the adapted prediction's foreground fraction on the unlabeled
    volume ends closer to the support fraction than without; the foundation is untouched either way."""
    _, plain_weight, plain_fraction = _over_segmenting_run(prior=False)
    net, prior_weight, prior_fraction = _over_segmenting_run(prior=True)
    assert plain_fraction > 0.5  # the unconstrained prediction is far too large (target 0.05)
    assert not torch.equal(prior_weight, plain_weight)
    assert abs(prior_fraction - TARGET) < abs(plain_fraction - TARGET) - 1e-3
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        "spatial_adapter.conv1.weight",
        "spatial_adapter.conv2.weight",
    }


def test_no_prior_during_the_warm_up():
    """Until warmup_iterations the handler adds nothing: the run is bit-identical to one without it."""
    _, plain_weight, _ = _over_segmenting_run(prior=False, steps=3)
    _, warm_weight, _ = _over_segmenting_run(prior=True, warmup=3, steps=3)
    assert torch.equal(plain_weight, warm_weight)


def test_the_penalty_reaches_the_gradients_dgst_clips(tiny_dynunet, trainer_factory):
    """Attached before DGSTHandler, the penalty's gradient is in .grad when DGSTHandler runs (here with dgst on
    a deep-supervised network in train mode); attached after it, it is refused."""
    net = tiny_dynunet()
    unlabeled = DataLoader([{"image": torch.randn(1, 20, 20, 20)}], batch_size=1)
    prior = SizePriorHandler(unlabeled, 0.01, PATCH, warmup_iterations=0, weight=1.0, margin=0.0)
    trainer = trainer_factory(net, decay_sgd(net), iterations=1)
    seen = {}

    def before_prior(engine):
        seen["before"] = net.output_block.conv.conv.bias.grad.clone()

    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.clear())
    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, before_prior)
    prior.attach(trainer)
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED, lambda e: seen.update(after=net.output_block.conv.conv.bias.grad.clone())
    )
    handler = DGSTHandler(method="dgst")
    handler.attach(trainer)
    trainer.run()
    assert not torch.equal(seen["before"], seen["after"]) and float(prior.last_penalty) > 0

    late = SizePriorHandler(unlabeled, 0.01, PATCH)
    with pytest.raises(ValueError, match="before FineTuningHandler"):
        late.attach(trainer)
