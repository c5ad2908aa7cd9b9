"""SwinUNETR v1 and v2 backbones of the lymph-node foundation model zoo (MONAI's implementation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from monai.networks.nets import SwinUNETR

from dgst_monai.networks.planner import preset_arguments

__all__ = ["SWINUNETR_PRESETS", "SWINUNETR_VERSIONS", "SwinUNETRPlan", "build_swinunetr", "swinunetr_plan"]

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


@dataclass(frozen=True)
class SwinUNETRPlan:
    """A SwinUNETR configuration of the ``ln_ct_swinunetr`` bundle: sampling, patch and network size.

    The counterpart of :class:`dgst_monai.networks.planner.DynUNetPlan` (same ``spacing``, ``patch_size``,
    ``batch_size``, :meth:`network` and :meth:`to_config`), so both bundles read their topology from one place.

    Attributes:
        spacing: target voxel spacing in mm (x, y, z).
        patch_size: training patch and sliding-window ROI, every axis a multiple of 32.
        feature_size: embedding size, a multiple of 12.
        version: ``"v1"`` or ``"v2"``.
        depths: Swin blocks per stage.
        batch_size: training batch size.
    """

    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    feature_size: int = 48
    version: str = "v1"
    depths: tuple[int, ...] = (2, 2, 2, 2)
    batch_size: int = 2

    def __post_init__(self) -> None:
        for name in ("spacing", "patch_size", "depths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(p % 32 for p in self.patch_size):
            raise ValueError(f"SwinUNETR needs every patch axis to be a multiple of 32, got {list(self.patch_size)}")

    def check_patch(self, patch_size: Any) -> list[int]:
        """``patch_size`` as a list, if SwinUNETR can take it (every axis a multiple of 32, its total stride).

        Raises:
            ValueError: a patch of another dimension, or an axis that is not a multiple of 32.
        """
        patch = [int(p) for p in patch_size]
        if len(patch) != len(self.patch_size) or any(p < 1 or p % 32 for p in patch):
            raise ValueError(
                f"patch_size {patch} does not fit the network: SwinUNETR's total stride is 32 on every axis, "
                f"so each axis must be a multiple of 32, e.g. {[max(32, round(p / 32) * 32) for p in patch]}"
            )
        return patch

    def network(self, in_channels: int = 1, out_channels: int = 2, deep_supervision: bool = False) -> SwinUNETR:
        """Build the network. SwinUNETR has no deep supervision: ``deep_supervision`` is accepted so that the
        bundle wiring is the same for both networks, and changes nothing."""
        return build_swinunetr(
            self.version,  # type: ignore[arg-type]
            in_channels=in_channels,
            out_channels=out_channels,
            feature_size=self.feature_size,
            depths=self.depths,
        )

    @classmethod
    def from_config(cls, preset: str | None = None, **fields: Any) -> SwinUNETRPlan:
        """The plan a bundle config writes out: ``fields`` as :meth:`to_config` gives them, or, when ``preset``
        names one of :data:`SWINUNETR_PRESETS`, that preset's plan with the written ``version`` (the bundle's
        ``swin_version``: a preset sets the network's size, not its version).

        Raises:
            ValueError: an unknown preset (the message lists the known ones).
            TypeError: a field the plan does not have.
        """
        if preset:
            return swinunetr_plan(preset, version=fields.get("version", "v1"))
        return cls(**fields)

    def to_config(self) -> dict[str, Any]:
        """The plan as a bundle config component (``"plan": {...}``) that rebuilds exactly this plan."""
        return {
            "_target_": f"{SwinUNETRPlan.__module__}.SwinUNETRPlan",
            "spacing": list(self.spacing),
            "patch_size": list(self.patch_size),
            "feature_size": self.feature_size,
            "version": self.version,
            "depths": list(self.depths),
            "batch_size": self.batch_size,
        }


#: Named SwinUNETR configurations, the same names as the DynUNet planner's presets; axes (x, y, z).
SWINUNETR_PRESETS: dict[str, dict[str, Any]] = {
    # LN-Seg-FM's SwinUNETR: feature size 48; the patch rounds the DynUNet's 224x112x80 to multiples of 32
    "paper": dict(spacing=(0.8, 0.8, 2.5), patch_size=(224, 128, 64), feature_size=48),
    "cpu-small": dict(spacing=(1.5, 1.5, 3.0), patch_size=(64, 64, 32), feature_size=12),
    # more than one voxel at the bottleneck needs 64x64x32 at least; one Swin block per stage
    "tiny": dict(spacing=(1.5, 1.5, 3.0), patch_size=(64, 64, 32), feature_size=12, depths=(1, 1, 1, 1)),
}


def swinunetr_plan(name: str, **overrides: Any) -> SwinUNETRPlan:
    """The SwinUNETR configuration of a named preset (``paper``, ``cpu-small``, ``tiny``).

    Example::

        plan = swinunetr_plan("cpu-small", version="v2")
        net = plan.network(in_channels=1, out_channels=2)
    """
    return SwinUNETRPlan(**preset_arguments(SWINUNETR_PRESETS, name, "SwinUNETR", **overrides))
