"""SwinUNETR v1 and v2 backbones of the lymph-node foundation model zoo (MONAI's implementation)."""

from __future__ import annotations

from typing import Any, Literal

from monai.networks.nets import SwinUNETR

__all__ = ["SWINUNETR_VERSIONS", "build_swinunetr"]

SWINUNETR_VERSIONS: tuple[str, ...] = ("v1", "v2")


def build_swinunetr(
    version: Literal["v1", "v2"] = "v1",
    in_channels: int = 1,
    out_channels: int = 2,
    feature_size: int = 48,
    use_checkpoint: bool | None = None,
    **kwargs: Any,
) -> SwinUNETR:
    """MONAI SwinUNETR, v1 or v2 (v2 adds a residual conv block before each Swin stage).

    MONAI 1.6 infers the image size at run time (no ``img_size``): every spatial size of the input must be
    divisible by 32 (patch embedding 2 x four 2x mergings), and the deepest feature map must have more than
    one voxel (instance norm), e.g. a 64x64x64 or 96x96x64 patch.

    Args:
        version: ``"v1"`` (Hatamizadeh et al. 2022) or ``"v2"`` (``use_v2=True``).
        in_channels: input channels (1 for CT).
        out_channels: classes including background.
        feature_size: embedding size, a multiple of 12 (48 in the paper's model zoo, 24 in MONAI's default).
        use_checkpoint: gradient checkpointing of the Swin blocks; None enables it for v2 only (its default
            in the LN-Seg-FM zoo, trading compute for memory).
        **kwargs: further :class:`monai.networks.nets.SwinUNETR` arguments (``depths``, ``num_heads``,
            ``drop_rate``, ...).

    Returns:
        The network; its parameter layout (encoder/decoder/head) is registered in :mod:`dgst_monai.networks`.

    Raises:
        ValueError: unknown version, feature_size not a positive multiple of 12, or an ``img_size`` argument.

    Example::

        net = build_swinunetr("v2", in_channels=1, out_channels=2, feature_size=48)
        logits = net(torch.zeros(1, 1, 96, 96, 64))  # (1, 2, 96, 96, 64)
    """
    if version not in SWINUNETR_VERSIONS:
        raise ValueError(f"unknown SwinUNETR version {version!r}; known versions: {', '.join(SWINUNETR_VERSIONS)}")
    if isinstance(feature_size, bool) or not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
        # the Swin stages have 3, 6, 12, 24 heads over feature_size, 2x, 4x, 8x channels
        raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size!r}")
    if "img_size" in kwargs:
        raise ValueError(
            "img_size is not an argument of MONAI >= 1.5's SwinUNETR (the size is taken from the input); drop it"
        )
    if use_checkpoint is None:
        use_checkpoint = version == "v2"
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=feature_size,
        use_checkpoint=use_checkpoint,
        use_v2=version == "v2",
        **kwargs,
    )
