"""nnU-Net-style planning of a MONAI DynUNet: kernel sizes, strides and filters from spacing and patch size.

The rules are those of nnU-Net v2's ``3d_fullres`` planner (``ExperimentPlanner`` and
``get_pool_and_conv_props``), re-derived here for MONAI's DynUNet:

* Pooling, one stage at a time: an axis is pooled (stride 2) while its feature map still has at least
  ``2 * min_feature_map_size`` voxels and its current spacing is less than twice the finest current spacing
  among the axes that may still pool. If only one axis is left it needs ``3 * min_feature_map_size`` voxels.
  So a coarse slice axis waits (2x2x1 pooling) until in-plane pooling has caught up with its spacing.
* Kernels: 1 along an axis while its current spacing is at least twice the finest current spacing (an
  in-plane-only 3x3x1 kernel on thick slices), 3 from then on; the bottleneck is always 3x3x3.
* Filters: ``base_filters`` (32) doubling per stage, capped at 320 (3D) or 512 (2D).
* The patch is padded up to a multiple of each axis' total stride.
* Memory: nnU-Net's estimate (feature-map elements written by every convolution, transposed convolution and
  segmentation head) against its calibration (560e6 elements = 8 GB at batch 2 for the plain U-Net, 680e6 for
  the residual encoder); while over budget, the axis with the largest extent (in mm, or relative to the median
  image shape when given) is shrunk by one stride multiple and the topology re-planned.
* Deep supervision: nnU-Net gives its lowest-resolution output zero weight, so it trains
  ``n_stages - 2`` outputs: the full-resolution one plus ``deep_supr_num = n_stages - 3`` extra heads.

Axes are whatever order the caller uses (the rules depend only on spacing and size per axis); the bundle uses
MONAI's array order after ``Orientationd("RAS")``, i.e. (x, y, z), so nnU-Net's (z, y, x) patch 80x112x224
is ``(224, 112, 80)`` here.

Differences from nnU-Net, on purpose: the target patch is given (nnU-Net derives it from the median image
shape and grows it up to the memory budget); the batch size is given (nnU-Net raises it to fill the memory);
MONAI's DynUNet has exactly two convolutions per stage. The plain plan builds nnU-Net's layout
(:class:`dgst_monai.networks.nnunet_layout.NNUNetDynUNet`: a bias in every convolution, nnU-Net's decoder
kernels), so that imported nnU-Net weights load into the same class and Bias / Bias+Norm / DGST train what the
paper's do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monai.networks.blocks.dynunet_block import UnetResBlock
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai.networks.nnunet_layout import NNUNetDynUNet

__all__ = [
    "PRESETS",
    "DynUNetPlan",
    "ResidualEncoderDynUNet",
    "estimate_feature_map_elements",
    "plan_dynunet",
    "plan_preset",
    "preset_arguments",
]

#: nnU-Net v2's calibration: feature-map elements of one sample that fit ``REFERENCE_GB`` at batch 2.
REFERENCE_ELEMENTS_PLAIN = 560_000_000
REFERENCE_ELEMENTS_RESIDUAL = 680_000_000
REFERENCE_GB = 8.0
#: nnU-Net's residual encoder (ResEncM/L): residual blocks per encoder stage.
RESENC_BLOCKS_PER_STAGE = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
#: nnU-Net's pooling limit: each axis of the bottleneck keeps at least about this many voxels.
MIN_FEATURE_MAP_SIZE = 4


class ResidualEncoderDynUNet(DynUNet):
    """A DynUNet whose encoder stages hold several residual blocks (nnU-Net ResEnc-like), decoder unchanged.

    Stage ``s`` of the encoder (``input_block``, ``downsamples[s - 1]``, ``bottleneck``) is a sequence of
    ``blocks_per_stage[s]`` MONAI ``UnetResBlock``s, the first with the stage's stride. Everything else,
    including the child names the fine-tuning registry relies on, is DynUNet's.

    Args:
        blocks_per_stage: residual blocks per encoder stage, one entry per stage (``len(strides)``).
        *args, **kwargs: as :class:`monai.networks.nets.DynUNet`; ``res_block`` is forced to True.

    Example::

        net = ResidualEncoderDynUNet(
            spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3, 3],
            strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[8, 16, 32, 64],
            blocks_per_stage=[1, 2, 3, 3],
        )
    """

    def __init__(self, *args: Any, blocks_per_stage: Sequence[int], **kwargs: Any) -> None:
        kwargs["res_block"] = True
        blocks = tuple(int(b) for b in blocks_per_stage)
        if any(b < 1 for b in blocks):
            raise ValueError(f"blocks_per_stage must be >= 1 everywhere, got {list(blocks_per_stage)}")
        # read by the get_* builders that DynUNet.__init__ calls
        self._blocks_per_stage = blocks
        super().__init__(*args, **kwargs)
        if len(blocks) != len(self.strides):
            raise ValueError(
                f"blocks_per_stage has {len(blocks)} entries but the network has {len(self.strides)} stages"
            )

    def _stage(self, index: int, in_channels: int, out_channels: int, kernel: Any, stride: Any) -> nn.Module:
        first = UnetResBlock(
            self.spatial_dims, in_channels, out_channels, kernel, stride, self.norm_name, self.act_name, self.dropout
        )
        n_blocks = self._blocks_per_stage[index] if index < len(self._blocks_per_stage) else 1
        if n_blocks == 1:
            return first
        rest = [
            UnetResBlock(
                self.spatial_dims, out_channels, out_channels, kernel, 1, self.norm_name, self.act_name, self.dropout
            )
            for _ in range(n_blocks - 1)
        ]
        return nn.Sequential(first, *rest)

    def get_input_block(self) -> nn.Module:
        return self._stage(0, self.in_channels, self.filters[0], self.kernel_size[0], self.strides[0])

    def get_downsamples(self) -> nn.ModuleList:
        n = len(self.strides)
        return nn.ModuleList(
            self._stage(s, self.filters[s - 1], self.filters[s], self.kernel_size[s], self.strides[s])
            for s in range(1, n - 1)
        )

    def get_bottleneck(self) -> nn.Module:
        n = len(self.strides)
        return self._stage(n - 1, self.filters[-2], self.filters[-1], self.kernel_size[-1], self.strides[-1])


@dataclass(frozen=True)
class DynUNetPlan:
    """A planned DynUNet topology, all per-axis values in the caller's axis order (the bundle's: x, y, z).

    Attributes:
        patch_size: training patch (and sliding-window ROI), divisible by the total stride of each axis.
        kernel_size: conv kernel per stage (``input_block``, downsamples..., ``bottleneck``).
        strides: stride per stage; the first is all ones.
        upsample_kernel_size: transposed-conv kernel per decoder stage (``strides[1:]``).
        filters: output channels per stage.
        deep_supr_num: extra deep-supervision heads (nnU-Net trains ``n_stages - 2`` outputs).
        spacing: target voxel spacing in mm.
        batch_size: training batch size the memory estimate assumed.
        residual: residual blocks (``UnetResBlock``) instead of plain ones.
        blocks_per_stage: residual blocks per encoder stage (residual encoder), None for one per stage.
        norm_name: normalization, as MONAI's ``norm_name`` (nnU-Net: affine instance norm, eps 1e-5).
        act_name: activation, as MONAI's ``act_name`` (nnU-Net: leaky ReLU, slope 0.01).
        conv_bias: a bias in every convolution and transposed convolution (nnU-Net's ``conv_bias``).
    """

    patch_size: tuple[int, ...]
    kernel_size: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    upsample_kernel_size: tuple[tuple[int, ...], ...]
    filters: tuple[int, ...]
    deep_supr_num: int
    spacing: tuple[float, ...]
    batch_size: int = 2
    residual: bool = False
    blocks_per_stage: tuple[int, ...] | None = None
    norm_name: tuple[str, dict[str, Any]] = ("INSTANCE", {"affine": True, "eps": 1e-5})
    act_name: tuple[str, dict[str, Any]] = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
    conv_bias: bool = True

    def __post_init__(self) -> None:
        # a plan read back from a bundle config (``to_config``) arrives as JSON lists
        for name in ("patch_size", "filters", "spacing", "blocks_per_stage"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        for name in ("kernel_size", "strides", "upsample_kernel_size"):
            object.__setattr__(self, name, tuple(tuple(v) for v in getattr(self, name)))
        for name in ("norm_name", "act_name"):
            kind, args = getattr(self, name)
            object.__setattr__(self, name, (str(kind), dict(args)))

    @property
    def n_stages(self) -> int:
        """Resolution stages, bottleneck included."""
        return len(self.strides)

    @property
    def total_strides(self) -> tuple[int, ...]:
        """The product of the stage strides per axis: every patch axis must be a multiple of it."""
        totals = [1] * len(self.strides[0])
        for stride in self.strides:
            totals = [t * s for t, s in zip(totals, stride)]
        return tuple(totals)

    def check_patch(self, patch_size: Any) -> list[int]:
        """``patch_size`` as a list, if the network can take it (each axis a positive multiple of
        :attr:`total_strides`); a bundle's ``initialize`` checks an overridden ``--patch_size`` with it.

        Raises:
            ValueError: a patch of another dimension, or an axis that is not a multiple of its total stride.
        """
        patch = [int(p) for p in patch_size]
        totals = self.total_strides
        if len(patch) != len(totals) or any(p < 1 or p % t for p, t in zip(patch, totals)):
            raise ValueError(
                f"patch_size {patch} does not fit the network: each axis must be a multiple of its total stride "
                f"{list(totals)} (the product of the strides {[list(s) for s in self.strides]}), e.g. "
                f"{[max(t, round(p / t) * t) for p, t in zip(patch, totals)]}"
            )
        return patch

    @property
    def bottleneck_size(self) -> tuple[int, ...]:
        """Feature-map size at the bottleneck for one patch."""
        return _sizes(self.patch_size, self.strides)[-1]

    def network(
        self,
        in_channels: int = 1,
        out_channels: int = 2,
        deep_supervision: bool = True,
        residual: bool | None = None,
    ) -> DynUNet:
        """Build the planned network.

        Args:
            in_channels: input channels (1 for CT).
            out_channels: classes including background.
            deep_supervision: add the ``deep_supr_num`` extra heads (training output stacks them on dim 1).
            residual: residual blocks; None uses the plan's choice. A plan with ``blocks_per_stage`` builds a
                :class:`ResidualEncoderDynUNet`.

        Returns:
            A MONAI DynUNet with nnU-Net's affine instance norm and leaky ReLU: the nnU-Net layout
            (:class:`~dgst_monai.networks.nnunet_layout.NNUNetDynUNet`, biased convolutions) for a plain plan,
            MONAI's residual blocks for a residual one. Without deep supervision it loads the deep-supervised
            training checkpoint of the same plan strictly (the extra heads are dropped): the inference network.

        Example::

            net = plan_preset("cpu-small").network(in_channels=1, out_channels=2)
        """
        residual = self.residual if residual is None else residual
        kwargs: dict[str, Any] = dict(
            spatial_dims=len(self.patch_size),
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[list(k) for k in self.kernel_size],
            strides=[list(s) for s in self.strides],
            upsample_kernel_size=[list(u) for u in self.upsample_kernel_size],
            filters=list(self.filters),
            norm_name=(self.norm_name[0], dict(self.norm_name[1])),
            act_name=(self.act_name[0], dict(self.act_name[1])),
            deep_supervision=deep_supervision,
            deep_supr_num=self.deep_supr_num,
            res_block=residual,
        )
        if residual and self.blocks_per_stage is not None:
            return ResidualEncoderDynUNet(blocks_per_stage=list(self.blocks_per_stage), **kwargs)
        if residual:
            return DynUNet(**kwargs)
        kwargs.pop("res_block")
        return NNUNetDynUNet(**kwargs, conv_bias=self.conv_bias, trans_bias=self.conv_bias)

    @classmethod
    def from_config(cls, preset: str | None = None, **fields: Any) -> DynUNetPlan:
        """The plan a bundle config writes out: ``fields`` as :meth:`to_config` gives them, or, when ``preset``
        names one of :data:`PRESETS` (``--preset cpu-small``), that preset's plan instead of the written one.

        Raises:
            ValueError: an unknown preset (the message lists the known ones).
            TypeError: a field the plan does not have.

        Example::

            "plan": {"_target_": "dgst_monai.networks.planner.DynUNetPlan.from_config", "preset": "@preset",
                     "patch_size": [224, 112, 80], "strides": [[1, 1, 1], [2, 2, 1], ...], ...}
        """
        return plan_preset(preset) if preset else cls(**fields)

    def to_config(self) -> dict[str, Any]:
        """The plan as a bundle config component (``"plan": {...}``) that rebuilds exactly this plan.

        Example::

            config["plan"] = plan_preset("cpu-small").to_config()  # an exported bundle carries its topology
        """
        return {
            "_target_": f"{DynUNetPlan.__module__}.DynUNetPlan",
            "patch_size": list(self.patch_size),
            "kernel_size": [list(k) for k in self.kernel_size],
            "strides": [list(s) for s in self.strides],
            "upsample_kernel_size": [list(u) for u in self.upsample_kernel_size],
            "filters": list(self.filters),
            "deep_supr_num": self.deep_supr_num,
            "spacing": list(self.spacing),
            "batch_size": self.batch_size,
            "residual": self.residual,
            "blocks_per_stage": None if self.blocks_per_stage is None else list(self.blocks_per_stage),
            "norm_name": [self.norm_name[0], dict(self.norm_name[1])],
            "act_name": [self.act_name[0], dict(self.act_name[1])],
            "conv_bias": self.conv_bias,
        }

    def estimate_feature_map_elements(self, out_channels: int = 2, deep_supervision: bool = True) -> int:
        """nnU-Net's memory proxy for one sample of this plan, see :func:`estimate_feature_map_elements`."""
        return estimate_feature_map_elements(
            self.patch_size,
            self.strides,
            self.filters,
            out_channels=out_channels,
            deep_supervision=deep_supervision,
            residual=self.residual,
            blocks_per_stage=self.blocks_per_stage,
        )


def _sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Feature-map size after each stage's stride (floor division, as nnU-Net counts)."""
    sizes = []
    size = tuple(patch_size)
    for stride in strides:
        size = tuple(a // s for a, s in zip(size, stride))
        sizes.append(size)
    return sizes


def estimate_feature_map_elements(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    filters: Sequence[int],
    out_channels: int = 2,
    deep_supervision: bool = True,
    residual: bool = False,
    blocks_per_stage: Sequence[int] | None = None,
) -> int:
    """Feature-map elements written by the convolutions of one sample: nnU-Net's proxy for GPU memory.

    Counted as nnU-Net's ``compute_conv_feature_map_size``: every conv output (two per plain block; conv1,
    conv2 and the 1x1 projection when the residual block changes shape), every transposed-conv output and the
    segmentation outputs (all decoder levels with deep supervision, else the top one).

    Example::

        estimate_feature_map_elements((224, 112, 80), plan.strides, plan.filters)
    """
    sizes = _sizes(patch_size, strides)
    n = len(strides)
    blocks = list(blocks_per_stage) if blocks_per_stage is not None else [1] * n
    total = 0
    channels_in = None
    for s in range(n):
        voxels = math.prod(sizes[s])
        for b in range(blocks[s] if residual else 1):
            total += 2 * filters[s] * voxels
            first = b == 0
            reshapes = first and (s == 0 or any(v != 1 for v in strides[s]) or channels_in != filters[s])
            if residual and reshapes:
                total += filters[s] * voxels  # conv3, the strided 1x1 projection of the skip path
        channels_in = filters[s]
    for level in range(n - 2, -1, -1):
        voxels = math.prod(sizes[level])
        total += 2 * filters[level] * voxels  # the decoder block's two convs
        total += filters[level] * voxels  # transposed conv
        if deep_supervision or level == 0:
            total += out_channels * voxels
    return total


def _check_spacing_and_patch(spacing: Sequence[float], patch_size: Sequence[int]) -> tuple[list[float], list[int]]:
    try:
        spacing_list = [float(v) for v in spacing]
        patch_list = [int(v) for v in patch_size]
    except (TypeError, ValueError):
        raise ValueError(
            f"spacing and patch_size must be sequences of numbers, got {spacing!r} and {patch_size!r}"
        ) from None
    if len(spacing_list) not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 entries (one per spatial axis), got {list(spacing)}")
    if len(patch_list) != len(spacing_list):
        raise ValueError(
            f"patch_size {list(patch_size)} and spacing {list(spacing)} must have one entry per axis each"
        )
    if not all(math.isfinite(v) and v > 0 for v in spacing_list):
        raise ValueError(f"spacing must be finite and > 0 mm on every axis, got {list(spacing)}")
    if any(p != v or p < 1 for p, v in zip(patch_list, patch_size)):
        raise ValueError(f"patch_size must be positive integers, got {list(patch_size)}")
    return spacing_list, patch_list


def _topology(
    spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int, max_pool_per_axis: int | None
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """nnU-Net's pooling and kernel rules: (kernels per stage, strides per stage, poolings per axis)."""
    dims = len(spacing)
    current_spacing = list(spacing)
    current_size = [float(p) for p in patch_size]
    limit = math.inf if max_pool_per_axis is None else max_pool_per_axis
    strides: list[list[int]] = [[1] * dims]
    kernels: list[list[int]] = []
    pools = [0] * dims
    kernel = [1] * dims
    while True:
        # an axis needs room for one more halving above the minimum bottleneck size
        candidates = [a for a in range(dims) if current_size[a] >= 2 * min_feature_map_size]
        if not candidates:
            break
        finest = min(current_spacing[a] for a in candidates)
        # too coarse relative to the finest candidate: wait until the others have caught up
        candidates = [a for a in candidates if current_spacing[a] / finest < 2 and pools[a] < limit]
        if not candidates:
            break
        if len(candidates) == 1 and current_size[candidates[0]] < 3 * min_feature_map_size:
            break  # nnU-Net does not pool a lone axis down to the minimum
        finest_all = min(current_spacing)
        # once an axis is within 2x of the finest spacing its kernel becomes 3 and stays 3
        kernel = [3 if k == 3 or current_spacing[a] / finest_all < 2 else 1 for a, k in enumerate(kernel)]
        stride = [2 if a in candidates else 1 for a in range(dims)]
        for a in candidates:
            pools[a] += 1
            current_spacing[a] *= 2
            current_size[a] = math.ceil(current_size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dims)  # bottleneck
    return kernels, strides, pools


def _pad_to_multiple(patch_size: Sequence[int], pools: Sequence[int]) -> list[int]:
    return [math.ceil(p / 2**n) * 2**n for p, n in zip(patch_size, pools)]


def plan_dynunet(
    spacing: Sequence[float],
    patch_size: Sequence[int],
    *,
    memory_gb: float | None = 8.0,
    batch_size: int = 2,
    base_filters: int = 32,
    max_filters: int | None = None,
    min_feature_map_size: int = MIN_FEATURE_MAP_SIZE,
    max_pool_per_axis: int | None = None,
    residual: bool = False,
    blocks_per_stage: Sequence[int] | None = None,
    out_channels: int = 2,
    median_shape: Sequence[int] | None = None,
) -> DynUNetPlan:
    """Plan a DynUNet like nnU-Net v2's ``3d_fullres`` for a target spacing, patch size and memory budget.

    Args:
        spacing: median (target) voxel spacing in mm, one per axis, in the caller's axis order.
        patch_size: target patch, same axis order; padded up to a multiple of each axis' total stride.
        memory_gb: GPU memory budget in nnU-Net's calibration (8 GB = its default); the patch shrinks until
            the estimate fits at ``batch_size``. None disables the check (CPU presets).
        batch_size: training batch size (nnU-Net's minimum and the paper's: 2).
        base_filters: channels of the first stage; doubled per stage.
        max_filters: channel cap; None gives nnU-Net's 320 (3D) or 512 (2D).
        min_feature_map_size: stop pooling an axis before it drops under this many voxels (nnU-Net: 4).
        max_pool_per_axis: optional cap on poolings per axis.
        residual: residual blocks (MONAI ``UnetResBlock``), like nnU-Net's ResEnc presets.
        blocks_per_stage: residual blocks per encoder stage; with ``residual=True`` and None, nnU-Net ResEnc's
            (1, 3, 4, 6, 6, 6, ...) deeper encoder. Pass ``[1] * n`` for a plain residual DynUNet.
        out_channels: classes, for the memory estimate of the segmentation heads.
        median_shape: median image shape after resampling; if given, the patch axis largest relative to it is
            shrunk first (nnU-Net's rule), else the axis with the largest extent in mm.

    Returns:
        The plan; build the network with :meth:`DynUNetPlan.network`.

    Raises:
        ValueError: invalid inputs, a patch too small for the two poolings DynUNet needs, or a memory budget
            that no patch satisfies.

    Example::

        # thick slices: 3x3x1 kernels and 2x2x1 pooling until in-plane spacing catches up with 3 mm
        plan = plan_dynunet(spacing=(0.7, 0.7, 3.0), patch_size=(192, 192, 48))
        plan.strides[:3]  # ((1, 1, 1), (2, 2, 1), (2, 2, 1))
        net = plan.network(in_channels=1, out_channels=2)
    """
    spacing_list, patch_list = _check_spacing_and_patch(spacing, patch_size)
    dims = len(spacing_list)
    cap = _check_plan_options(dims, memory_gb, batch_size, base_filters, max_filters, min_feature_map_size,
                              max_pool_per_axis, residual, blocks_per_stage, out_channels, median_shape)

    def build(patch: Sequence[int]) -> tuple[DynUNetPlan, list[int]]:
        kernels, strides, pools = _topology(spacing_list, patch, min_feature_map_size, max_pool_per_axis)
        n_stages = len(strides)
        if n_stages < 3:
            raise ValueError(
                f"patch_size {list(patch)} at spacing {spacing_list} allows only {n_stages - 1} pooling(s) "
                f"(each pooled axis needs >= {2 * min_feature_map_size} voxels); DynUNet needs at least 2: "
                "use a larger patch or a smaller min_feature_map_size"
            )
        if residual:
            blocks = tuple(blocks_per_stage) if blocks_per_stage is not None else _resenc_blocks(n_stages)
            if len(blocks) != n_stages:
                raise ValueError(
                    f"blocks_per_stage has {len(blocks)} entries but the plan has {n_stages} stages: {list(blocks)}"
                )
        else:
            blocks = None
        plan = DynUNetPlan(
            patch_size=tuple(_pad_to_multiple(patch, pools)),
            kernel_size=tuple(tuple(k) for k in kernels),
            strides=tuple(tuple(s) for s in strides),
            upsample_kernel_size=tuple(tuple(s) for s in strides[1:]),
            filters=tuple(min(cap, base_filters * 2**s) for s in range(n_stages)),
            # nnU-Net weights its lowest-resolution output 0: n_stages - 2 trained outputs
            deep_supr_num=min(max(1, n_stages - 3), n_stages - 2),
            spacing=tuple(spacing_list),
            batch_size=batch_size,
            residual=residual,
            blocks_per_stage=blocks,
        )
        return plan, [2**p for p in pools]

    plan, divisor = build(patch_list)
    if memory_gb is None:
        return plan
    return _shrink_to_memory(plan, divisor, build, memory_gb, batch_size, out_channels, residual, median_shape,
                             min_feature_map_size, max_pool_per_axis)


def _check_plan_options(dims: int, memory_gb: float | None, batch_size: int, base_filters: int,
                       max_filters: int | None, min_feature_map_size: int, max_pool_per_axis: int | None,
                       residual: bool, blocks_per_stage: Sequence[int] | None, out_channels: int,
                       median_shape: Sequence[int] | None) -> int:
    """:func:`plan_dynunet`'s options checked; returns the channel cap (nnU-Net's 320 in 3D, 512 in 2D)."""
    if memory_gb is not None and not (math.isfinite(memory_gb) and memory_gb > 0):
        raise ValueError(f"memory_gb must be > 0 (or None to skip the memory check), got {memory_gb!r}")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("base_filters", base_filters, 1),
        ("min_feature_map_size", min_feature_map_size, 1),
        ("out_channels", out_channels, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_pool_per_axis is not None and (not isinstance(max_pool_per_axis, int) or max_pool_per_axis < 1):
        raise ValueError(f"max_pool_per_axis must be an integer >= 1 or None, got {max_pool_per_axis!r}")
    cap = max_filters if max_filters is not None else (320 if dims == 3 else 512)
    if cap < base_filters:
        raise ValueError(f"max_filters ({cap}) must be >= base_filters ({base_filters})")
    if blocks_per_stage is not None and not residual:
        raise ValueError("blocks_per_stage needs residual=True (it sets residual blocks per encoder stage)")
    if median_shape is not None and (len(median_shape) != dims or any(m <= 0 for m in median_shape)):
        raise ValueError(f"median_shape must have {dims} positive entries, got {list(median_shape)}")
    return cap


def _shrink_to_memory(plan: DynUNetPlan, divisor: list[int],
                      build: Callable[[Sequence[int]], tuple[DynUNetPlan, list[int]]], memory_gb: float,
                      batch_size: int, out_channels: int, residual: bool, median_shape: Sequence[int] | None,
                      min_feature_map_size: int, max_pool_per_axis: int | None) -> DynUNetPlan:
    """Shrink the plan's patch, one axis step at a time, until nnU-Net's memory estimate fits ``memory_gb``."""
    spacing_list, dims = list(plan.spacing), len(plan.spacing)
    reference = (REFERENCE_ELEMENTS_RESIDUAL if residual else REFERENCE_ELEMENTS_PLAIN) * memory_gb / REFERENCE_GB
    # nnU-Net's reference is for batch 2
    while plan.estimate_feature_map_elements(out_channels) * batch_size / 2 > reference:
        patch = list(plan.patch_size)
        if median_shape is not None:
            extent = [p / m for p, m in zip(patch, median_shape)]
        else:
            extent = [p * s for p, s in zip(patch, spacing_list)]
        axis = max(range(dims), key=lambda a: (extent[a], -a))
        # step by the divisor of the smaller patch, so that e.g. 224 (7 x 32) is not skipped on the way from 256
        no_fit = ValueError(
            f"no patch fits memory_gb={memory_gb} at batch_size={batch_size}: stopped at patch {patch} "
            f"(estimate {plan.estimate_feature_map_elements(out_channels):.3g} feature-map elements per "
            f"sample, budget {reference * 2 / batch_size:.3g})"
        )
        trial = list(patch)
        trial[axis] -= divisor[axis]
        if trial[axis] < 2 * min_feature_map_size:
            raise no_fit
        _, _, trial_pools = _topology(spacing_list, trial, min_feature_map_size, max_pool_per_axis)
        patch[axis] -= 2 ** trial_pools[axis]
        try:
            plan, divisor = build(patch)
        except ValueError:  # the shrunk patch no longer allows two poolings
            raise no_fit from None
    return plan


def _resenc_blocks(n_stages: int) -> tuple[int, ...]:
    if n_stages <= len(RESENC_BLOCKS_PER_STAGE):
        return RESENC_BLOCKS_PER_STAGE[:n_stages]
    return RESENC_BLOCKS_PER_STAGE + (RESENC_BLOCKS_PER_STAGE[-1],) * (n_stages - len(RESENC_BLOCKS_PER_STAGE))


#: Named plans: keyword arguments of :func:`plan_dynunet`, axes (x, y, z).
PRESETS: dict[str, dict[str, Any]] = {
    # the paper's foundation model: nnU-Net 3d_fullres, patch 80x112x224 (z, y, x), batch 2, 8 GB;
    # the RADCURE median spacing is not published: the bundle's 0.8 x 0.8 x 2.5 mm is used
    "paper": dict(spacing=(0.8, 0.8, 2.5), patch_size=(224, 112, 80), batch_size=2, memory_gb=8.0),
    # ResEncM / ResEncL-like: residual encoder (1, 3, 4, 6, 6, 6 blocks) at 8 / 24 GB, same target patch
    "paper-resenc-m": dict(
        spacing=(0.8, 0.8, 2.5), patch_size=(224, 112, 80), batch_size=2, memory_gb=8.0, residual=True
    ),
    "paper-resenc-l": dict(
        spacing=(0.8, 0.8, 2.5), patch_size=(224, 112, 80), batch_size=2, memory_gb=24.0, residual=True
    ),
    # configs/cpu_small.json: filters 16-128, bottleneck feature maps of 8 voxels, no memory check
    "cpu-small": dict(
        spacing=(1.5, 1.5, 3.0),
        patch_size=(64, 64, 32),
        batch_size=2,
        base_filters=16,
        min_feature_map_size=8,
        memory_gb=None,
    ),
    # the tests' and the smoke demo's: filters 8-64, a 32x32x16 patch, seconds per run on a CPU
    "tiny": dict(
        spacing=(1.5, 1.5, 3.0),
        patch_size=(32, 32, 16),
        batch_size=2,
        base_filters=8,
        min_feature_map_size=4,
        memory_gb=None,
    ),
}


def preset_arguments(
    presets: Mapping[str, Mapping[str, Any]], name: str, kind: str, **overrides: Any
) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` in ``presets``, with ``overrides`` replacing some of them.

    Args:
        presets: named keyword-argument sets (:data:`PRESETS`, ``SWINUNETR_PRESETS``).
        name: the preset.
        kind: what the presets configure, for the error (``"DynUNet plan"``).
        **overrides: keyword arguments replacing the preset's.

    Raises:
        ValueError: an unknown preset (the message lists the known ones).

    Example::

        preset_arguments(PRESETS, "tiny", "DynUNet plan", base_filters=4)["patch_size"]  # (32, 32, 16)
    """
    try:
        arguments = dict(presets[name])
    except KeyError:
        raise ValueError(f"unknown {kind} preset {name!r}; known presets: {', '.join(presets)}") from None
    arguments.update(overrides)
    return arguments


def plan_preset(name: str, **overrides: Any) -> DynUNetPlan:
    """The plan of a named preset (``paper``, ``paper-resenc-m``, ``paper-resenc-l``, ``cpu-small``, ``tiny``).

    Args:
        name: preset name, see :data:`PRESETS`.
        **overrides: keyword arguments of :func:`plan_dynunet` replacing the preset's.

    Example::

        plan_preset("paper").as_config()["strides"]
        plan_preset("cpu-small", base_filters=8).network()
    """
    return plan_dynunet(**preset_arguments(PRESETS, name, "DynUNet plan", **overrides))
