"""Inferers: test-time mirroring around any MONAI inferer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["MirroringInferer"]


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
