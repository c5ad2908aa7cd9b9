"""Inferers: nnU-Net's Gaussian window weights, test-time mirroring and reduced-precision network calls."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "PRECISIONS",
    "AutocastInferer",
    "GaussianSlidingWindowInferer",
    "MirroringInferer",
    "centred_gaussian",
    "window_starts",
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


def window_starts(size: int, roi: int, step: float = 0.5) -> list[int]:
    """Start voxels of the sliding windows along one axis, placed where nnU-Net's predictor places them.

    The number of windows is the fewest whose step is at most ``roi * step`` voxels; they are then spread
    evenly from the first voxel to the last (``round(i * (size - roi) / (windows - 1))``), so no two nearly
    coincide. MONAI's sliding window instead steps by ``int(roi * (1 - overlap))`` and moves the last window
    back to the border: on a 256-voxel axis 96-voxel windows start at 0, 48, 96, 144 and 160 with MONAI, at 0,
    40, 80, 120 and 160 here. An axis shorter than the window is padded to it first (one window, at 0).

    Args:
        size: the axis length.
        roi: the window length on that axis.
        step: the largest step as a fraction of the window (nnU-Net's ``tile_step_size``; overlap 0.5 is 0.5).

    Returns:
        The start voxels, ascending.

    Raises:
        ValueError: if ``step`` is not in (0, 1].

    Example::

        window_starts(312, 96)  # [0, 43, 86, 130, 173, 216]: steps of 43.2 voxels, rounded
    """
    if not 0 < step <= 1:
        raise ValueError(f"the window step must be in (0, 1] of the window (overlap in [0, 1)), got {step}")
    if size <= roi:
        return [0]
    windows = math.ceil((size - roi) / (roi * step)) + 1
    spacing = (size - roi) / (windows - 1)
    return [int(round(spacing * i)) for i in range(windows)]  # Python rounds half to even, as numpy does


class GaussianSlidingWindowInferer(Inferer):
    """Sliding-window inference as nnU-Net's predictor does it: its window places (:func:`window_starts`), its
    Gaussian window weights (:func:`centred_gaussian`) and its padding of axes shorter than the window.

    An axis shorter than the window is padded on both sides (half below, the rest above, with ``cval``) and the
    padding is cropped off the result. Windows are cut from the input ``sw_batch_size`` at a time, their outputs
    weighted and summed into one preallocated float32 accumulator; the weight sum per voxel is computed once
    per call, not per window. With the same weights, this gives nnU-Net's mask (``benchmarks/bench_nnunet.py``).

    Args:
        roi_size: the window size per spatial axis.
        sw_batch_size: windows per network call.
        overlap: fraction of the window shared by neighbours at most (nnU-Net's tile step 0.5 is overlap 0.5).
        sigma_scale: sigma of the window weights as a fraction of the window size.
        padding_mode: ``torch.nn.functional.pad`` mode for axes shorter than the window.
        cval: the padding value for ``padding_mode="constant"`` (0: the normalised intensity mean).
        sw_device: the device the network runs on (default: the input's).
        device: the device the output is accumulated on (default: the input's); a CPU accumulator lets a large
            volume run windows on a small GPU.

    Raises:
        ValueError: an ``overlap`` outside [0, 1).

    Example::

        inferer = GaussianSlidingWindowInferer(roi_size=(96, 96, 64), sw_batch_size=2, overlap=0.5)
        logits = inferer(image, network)  # (B, n_classes, *image.shape[2:])
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        sigma_scale: float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.roi_size = tuple(int(n) for n in roi_size)
        self.sw_batch_size = max(1, int(sw_batch_size))
        self.overlap = float(overlap)
        self.padding_mode = padding_mode
        self.cval = float(cval)
        self.sw_device = sw_device
        self.device = device
        self.roi_weight_map = centred_gaussian(self.roi_size, sigma_scale)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Sliding-window inference of ``inputs`` (``(B, C, *spatial)``).

        Args:
            inputs: batch-first input.
            network: a callable taking ``(n, C, *roi_size)`` windows to ``(n, n_classes, *roi_size)`` outputs.
            *args: passed on to ``network``.
            **kwargs: passed on to ``network``.

        Returns:
            ``(B, n_classes, *spatial)`` float32, of the input's type (a MetaTensor keeps the input's metadata).

        Raises:
            ValueError: if the input's spatial rank is not the window's, or the network changes the window size.
        """
        spatial = tuple(inputs.shape[2:])
        if len(spatial) != len(self.roi_size):
            raise ValueError(
                f"a {len(self.roi_size)}-D window {self.roi_size} does not fit an input of shape {tuple(inputs.shape)}"
            )
        device = torch.device(self.device) if self.device is not None else inputs.device
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        # pad short axes on both sides, half below (F.pad lists the last axis first)
        short = [max(0, roi - n) for n, roi in zip(spatial, self.roi_size)]
        pads = [p for d in reversed(short) for p in (d // 2, d - d // 2)]
        image = convert_to_tensor(inputs, track_meta=False)  # plain tensor: windows need no metadata
        if any(short):
            kwargs_pad = {"value": self.cval} if self.padding_mode == "constant" else {}
            image = torch.nn.functional.pad(image, pads, mode=self.padding_mode, **kwargs_pad)
        padded = tuple(image.shape[2:])
        starts = list(itertools.product(
            *[window_starts(n, roi, 1 - self.overlap) for n, roi in zip(padded, self.roi_size)]
        ))
        weights = self.roi_weight_map.to(device)
        weight_sum = torch.zeros(padded, dtype=torch.float32, device=device)
        for start in starts:
            weight_sum[self._window(start)] += weights
        total: torch.Tensor | None = None
        for b in range(image.shape[0]):
            for first in range(0, len(starts), self.sw_batch_size):
                chunk = starts[first:first + self.sw_batch_size]
                windows = torch.stack([image[b][(slice(None), *self._window(s))] for s in chunk]).to(sw_device)
                out = network(windows, *args, **kwargs)
                if not isinstance(out, torch.Tensor) or tuple(out.shape[2:]) != self.roi_size:
                    raise ValueError(
                        f"the network must map {self.roi_size} windows to outputs of the same size, got "
                        f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}"
                    )
                if total is None:
                    total = torch.zeros((image.shape[0], out.shape[1], *padded), dtype=torch.float32, device=device)
                out = torch.as_tensor(out).to(device=device, dtype=torch.float32)
                for s, window_out in zip(chunk, out):
                    total[(b, slice(None), *self._window(s))].addcmul_(window_out, weights)
        assert total is not None  # every input has at least one window
        total /= weight_sum
        if any(short):
            total = total[(slice(None), slice(None), *[slice(d // 2, d // 2 + n) for d, n in zip(short, spatial)])]
        return convert_to_dst_type(total, inputs, dtype=torch.float32)[0]

    def _window(self, start: Sequence[int]) -> tuple[slice, ...]:
        """The spatial slices of the window starting at ``start``."""
        return tuple(slice(s, s + n) for s, n in zip(start, self.roi_size))


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
        inferer: the inferer to wrap, e.g. :class:`GaussianSlidingWindowInferer`.
        spatial_axes: spatial axes to mirror, 0-based after the batch and channel dimensions; all combinations
            of flips along them are evaluated (the identity included).
        enabled: whether to mirror at all.
        eps: floor of the probabilities before the logarithm (keeps ``log`` finite).

    Raises:
        ValueError: if ``spatial_axes`` repeats an axis or holds a negative one.

    Example::

        inferer = MirroringInferer(GaussianSlidingWindowInferer(roi_size=(96, 96, 64)), spatial_axes=(0, 1, 2))
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

        inferer = AutocastInferer(MirroringInferer(GaussianSlidingWindowInferer(roi_size=(96, 96, 64))), "bfloat16")
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
