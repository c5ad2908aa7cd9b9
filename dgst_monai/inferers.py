"""Inferers: nnU-Net's Gaussian window weights, test-time mirroring and reduced-precision network calls."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = [
    "PRECISIONS",
    "AutocastInferer",
    "GaussianSlidingWindowInferer",
    "MirroringInferer",
    "centred_gaussian",
    "evenly_spread_overlap",
]

#: ``precision`` settings of the bundles -> autocast dtype (None: the network runs as it is, in float32).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def centred_gaussian(roi_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Window weights peaking at voxel ``n // 2`` of each axis of size ``n``, with sigma ``sigma_scale * n``.

    The weights are scaled to a maximum of 1 and floored at their smallest positive value, so no voxel of a
    window weighs zero. This is how nnU-Net's predictor weighs its windows. MONAI's ``compute_importance_map``
    centres its Gaussian between two voxels on even sizes, which moves the masks at voxels where overlapping
    windows disagree.

    Args:
        roi_size: the window size per spatial axis.
        sigma_scale: sigma as a fraction of the window size (nnU-Net and MONAI: 0.125).

    Returns:
        A float32 tensor of shape ``roi_size``.

    Example::

        weights = centred_gaussian((96, 96, 64))  # weights[48, 48, 32] == 1
    """
    axes = [
        torch.exp(-0.5 * ((torch.arange(n, dtype=torch.float64) - n // 2) / (sigma_scale * n)) ** 2)
        for n in roi_size
    ]
    weights = axes[0]
    for axis in axes[1:]:
        weights = weights[..., None] * axis
    weights = weights / weights.max()
    return weights.clamp_min(weights[weights > 0].min()).float()


def evenly_spread_overlap(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: float | Sequence[float] = 0.5
) -> tuple[float, ...]:
    """Per-axis overlaps for MONAI's sliding window that spread its windows evenly over ``image_size``.

    MONAI steps by ``int(roi * (1 - overlap))`` and moves the last window back to the border, so on a 256-voxel
    axis 96-voxel windows start at 0, 48, 96, 144 and 160: the last two nearly coincide. With the same number of
    windows, this returns the overlap whose step is ``ceil((size - roi) / (windows - 1))`` (0, 40, 80, 120, 160
    there), which is where nnU-Net's predictor puts them whenever that step is a whole number of voxels.

    Args:
        image_size: spatial size of the input (an axis shorter than the window is padded to it, one window).
        roi_size: window size per axis.
        overlap: the requested overlap (one for all axes, or one per axis); it sets the number of windows.

    Returns:
        One overlap per axis, for ``SlidingWindowInferer(overlap=...)``.

    Example::

        evenly_spread_overlap((256, 256, 160), (96, 96, 64))  # steps of 40, 40 and 32 voxels
    """
    overlaps = [float(overlap)] * len(roi_size) if isinstance(overlap, (int, float)) else [float(o) for o in overlap]
    spread = []
    for size, roi, requested in zip(image_size, roi_size, overlaps):
        size, roi = max(int(size), int(roi)), int(roi)
        if size == roi:
            spread.append(requested)
            continue
        windows = math.ceil((size - roi) / max(1, int(roi * (1 - requested)))) + 1
        step = math.ceil((size - roi) / (windows - 1))
        # MONAI truncates roi * (1 - overlap): aim half a voxel above the step so that rounding cannot move it
        spread.append(max(0.0, 1 - (step + 0.5) / roi))
    return tuple(spread)


class GaussianSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's sliding-window inferer with nnU-Net's Gaussian window weights (:func:`centred_gaussian`) and its
    evenly spread windows (:func:`evenly_spread_overlap`, the same number of windows as MONAI's).

    Everything else (padding, batching of windows, stitching) is MONAI's. Where the windows then fall where
    nnU-Net's do, the same weights give nnU-Net's mask (``benchmarks/bench_nnunet.py``).

    Args:
        roi_size: the window size per spatial axis.
        sw_batch_size: windows per network call.
        overlap: fraction of the window shared by neighbours (nnU-Net's tile step 0.5 is overlap 0.5).
        sigma_scale: sigma as a fraction of the window size.
        **kwargs: further :class:`monai.inferers.SlidingWindowInferer` arguments (``padding_mode``, ``device``, ...).

    Example::

        inferer = GaussianSlidingWindowInferer(roi_size=(96, 96, 64), sw_batch_size=2, overlap=0.5)
        logits = inferer(image, network)
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        sigma_scale: float = 0.125,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size, sw_batch_size, overlap, mode="gaussian", sigma_scale=sigma_scale, **kwargs)
        self.roi_weight_map = centred_gaussian([int(n) for n in roi_size], sigma_scale)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Sliding-window inference of ``inputs`` (``(B, C, *spatial)``) with the windows spread evenly."""
        window = copy.copy(self)  # the overlap is per input size; calls may run side by side (MONAI Label)
        window.overlap = evenly_spread_overlap(inputs.shape[2:], self.roi_size, self.overlap)
        return SlidingWindowInferer.__call__(window, inputs, network, *args, **kwargs)


class MirroringInferer(Inferer):
    """Test-time mirroring (nnU-Net's "mirroring" augmentation at inference) around another inferer.

    Every forward pass of the wrapped inferer (each sliding window) is run on all ``2 ** len(spatial_axes)``
    flips of its input; the softmax of each output is flipped back and the probabilities are averaged. The
    wrapped inferer aggregates those probabilities (for a sliding window: its weighted window average), and the
    result is returned as log-probabilities, so a following ``Activationsd(softmax=True)`` yields exactly the
    averaged probabilities (softmax of log p is p when p sums to 1) and ``argmax`` the class with the highest
    mean probability. Postprocessing is therefore the same with mirroring on or off.

    With ``enabled=False`` the wrapped inferer's output (the network's logits) is returned unchanged, so a
    bundle can expose mirroring as a plain flag.

    Args:
        inferer: the inferer to wrap, e.g. ``SlidingWindowInferer(roi_size=..., mode="gaussian")``.
        spatial_axes: spatial axes to mirror, 0-based after the batch and channel dimensions; all combinations
            of flips along them are evaluated (the identity included).
        enabled: whether to mirror at all.
        eps: floor of the probabilities before the logarithm (keeps ``log`` finite).

    Raises:
        ValueError: if ``spatial_axes`` repeats an axis or holds a negative one.

    Example::

        inferer = MirroringInferer(SlidingWindowInferer(roi_size=(96, 96, 64), overlap=0.5), spatial_axes=(0, 1, 2))
        log_probs = inferer(image, network)  # (B, C, *spatial); softmax(log_probs, 1) = mean of 8 flips
    """

    def __init__(
        self, inferer: Inferer, spatial_axes: Sequence[int] = (0, 1, 2), enabled: bool = True, eps: float = 1e-12
    ) -> None:
        super().__init__()
        axes = [int(a) for a in spatial_axes]
        if len(set(axes)) != len(axes) or any(a < 0 for a in axes):
            raise ValueError(f"spatial_axes must be distinct non-negative spatial axes, got {list(spatial_axes)}")
        self.inferer = inferer
        self.spatial_axes = tuple(axes)
        self.enabled = bool(enabled)
        self.eps = eps
        # tensor dims of every combination of flips (the empty one is the identity)
        self._flips = [
            tuple(2 + a for a in combo)
            for r in range(len(axes) + 1)
            for combo in itertools.combinations(axes, r)
        ]

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Run the wrapped inferer with ``network`` mirrored (or unchanged when disabled).

        Args:
            inputs: batch-first input, ``(B, C, *spatial)``.
            network: the model (any callable returning ``(B, n_classes, *spatial)`` logits).
            *args: passed to the wrapped inferer and on to ``network``.
            **kwargs: passed to the wrapped inferer and on to ``network``.
        """
        if not self.enabled:
            return self.inferer(inputs, network, *args, **kwargs)
        spatial_dims = inputs.ndim - 2
        if any(a >= spatial_dims for a in self.spatial_axes):
            raise ValueError(
                f"spatial_axes {self.spatial_axes} do not fit a {spatial_dims}-D input of shape {tuple(inputs.shape)}"
            )

        def mirrored(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
            total: torch.Tensor | None = None
            for dims in self._flips:
                out = network(torch.flip(x, dims) if dims else x, *a, **k)
                prob = torch.softmax(out.float(), dim=1)
                prob = torch.flip(prob, dims) if dims else prob
                total = prob if total is None else total + prob
            assert total is not None  # the identity is always among the flips
            return total / len(self._flips)

        return torch.log(self.inferer(inputs, mirrored, *args, **kwargs).clamp_min(self.eps))


class AutocastInferer(Inferer):
    """Runs every network call of another inferer under ``torch.autocast`` on the input's device, in ``precision``.

    MONAI's engines autocast only on CUDA (their ``amp`` flag); this runs the forward pass in bfloat16 (or
    float16) on any device, CPU included, where oneDNN's bfloat16 convolutions (AMX / AVX-512 BF16, e.g. Intel
    Sapphire Rapids or AMD Zen 4) are several times faster than float32. Each network output is cast back to
    float32, so what follows (window aggregation, softmax, loss, backward's parameter gradients) stays in
    float32; the weights are never converted. As a trainer's ``inferer`` it autocasts the training forward pass
    while the loss and backward run outside autocast, as PyTorch recommends; bfloat16 needs no gradient scaler.

    Args:
        inferer: the inferer whose network calls to autocast (``SimpleInferer`` for training, the sliding window
            or :class:`MirroringInferer` for inference).
        precision: ``"float32"`` (no autocast: the wrapped inferer runs unchanged), ``"bfloat16"`` or
            ``"float16"``.

    Raises:
        ValueError: an unknown ``precision``, naming the accepted ones.

    Example::

        inferer = AutocastInferer(MirroringInferer(SlidingWindowInferer(roi_size=(96, 96, 64))), "bfloat16")
        logits = inferer(image, network)  # float32, computed with bfloat16 convolutions
    """

    def __init__(self, inferer: Inferer, precision: str = "float32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r} (e.g. --precision bfloat16)"
            )
        self.inferer = inferer
        self.precision = precision
        self.dtype = PRECISIONS[precision]

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Run the wrapped inferer with ``network`` autocast (or unchanged for ``"float32"``).

        Args:
            inputs: batch-first input, ``(B, C, *spatial)``.
            network: the model.
            *args: passed to the wrapped inferer and on to ``network``.
            **kwargs: passed to the wrapped inferer and on to ``network``.
        """
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)
        dtype = self.dtype

        def autocast(x: torch.Tensor, *a: Any, **k: Any) -> Any:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                out = network(x, *a, **k)
            return _to_float32(out)

        return self.inferer(inputs, autocast, *args, **kwargs)


def _to_float32(out: Any) -> Any:
    """Floating tensors of a network output (a tensor, or a tuple / list / dict of them) as float32."""
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out
