"""Import a trained nnU-Net v2 model (PlainConvUNet) as a MONAI DynUNet with identical outputs.

nnU-Net v2 writes a model folder ``<results>/DatasetXXX/<trainer>__<plans>__<configuration>/`` holding
``plans.json``, ``dataset.json`` and ``fold_<f>/checkpoint_final.pth``; the checkpoint is a dict with
``network_weights`` (the network's ``state_dict()``), ``init_args`` (``plans``, ``configuration``, ``fold``,
``dataset_json``), ``trainer_name`` and training state. The architecture is
``plans["configurations"][configuration]["architecture"]``: ``network_class_name`` and ``arch_kwargs`` of
``dynamic_network_architectures``' ``PlainConvUNet`` (configurations may ``inherits_from`` another; plans of
nnU-Net < 2.4 keep the older flat keys ``UNet_class_name``, ``conv_kernel_sizes``, ... and are read too).

What differs between the two networks, and how it is bridged (:class:`NNUNetDynUNet`):

* Conv biases: nnU-Net's convs have ``bias=True`` (``conv_bias``); MONAI's ``UnetBasicBlock`` builds them
  without. :class:`NNUNetDynUNet` is a DynUNet subclass that gives its block convs biases after construction,
  and takes ``trans_bias`` for the transposed convs. It is re-buildable from its keyword arguments, so a bundle
  is the bundles' own network class (:mod:`dgst_monai.networks.nnunet_layout`, built by ``DynUNetPlan.network``).
* Decoder kernels: nnU-Net's decoder at resolution level ``l`` uses the encoder's kernel of level ``l``; stock
  DynUNet uses level ``l + 1``. Equal for isotropic plans, not for anisotropic ones (a 1x3x3 top stage), so
  :class:`NNUNetDynUNet` builds its decoder with nnU-Net's kernels.
* Tensor aliases: ``PlainConvUNet.state_dict()`` lists each tensor up to four times (``...convs.0.conv`` and
  ``...convs.0.all_modules.0``, and again under ``decoder.encoder``). Only the canonical names are read
  (the ones ``named_parameters()`` yields); the aliases are recognised and skipped, anything else is an error.
* Deep supervision: nnU-Net's ``decoder.seg_layers[d]`` is the 1x1x1 head of decoder stage ``d`` (0 = lowest
  resolution). DynUNet's ``output_block`` is ``seg_layers[-1]`` and ``deep_supervision_heads[k]`` is
  ``seg_layers[-2 - k]``; by default all of nnU-Net's ``n_stages - 1`` outputs are kept
  (``deep_supr_num = n_stages - 2``). In training mode nnU-Net returns each head at its own resolution and
  DynUNet stacks them upsampled (nearest) to full size; ``net.heads`` holds the native-resolution ones.

Axis order: nnU-Net runs its network on its preprocessed array: the image as SimpleITK returns it, index
axes reversed (``(z, y, x)`` for an axial CT; nnU-Net's NiBabel readers transpose to match), then permuted by
the plans' ``transpose_forward``, resampled to ``configurations[c]["spacing"]`` (given in that order).
``import_nnunet(..., axes="nnunet")`` (the default) keeps exactly that order: its input is
``(B, C, *nnunet_axes)``. The ``ln_ct_dynunet`` bundle feeds MONAI arrays, ``(B, C, x, y, z)`` (after
``Orientationd("RAS")`` by default, in the file's own order with ``orientation: "file"``); a bundle user
either transposes to nnU-Net's order and back (with ``p = bundle_to_nnunet_axes(transpose_forward)``:
``image.permute(0, 1, *[2 + p.index(a) for a in range(3)])`` in, ``logits.permute(0, 1, *[2 + a for a in p])``
out; for the usual ``transpose_forward = [0, 1, 2]`` both are ``permute(0, 1, 4, 3, 2)``), or imports with
``axes="bundle"``: kernels, strides and every conv weight are permuted so that the network takes
``(B, C, x, y, z)`` and returns the same logits, permuted (exactly: convolution commutes with an axis
permutation). :func:`export_nnunet` writes the ``axes="bundle"`` network and an override that sets the
bundle's ``orientation`` to ``"file"``: nnU-Net never reorients, so the bundle then skips ``Orientationd``
too, and the network sees the voxels in nnU-Net's order, not mirrored (on an LPS scan, RAS would flip x and
y, and with them the window places and weights).

Not supported (clear errors): ``ResidualEncoderUNet`` (nnU-Net ResEnc: several residual blocks per stage,
an average-pool shortcut and a stem that MONAI's DynUNet cannot hold), other classes and trainers that build
their own network (e.g. SwinUNETR trainers), 2D configurations, ``n_conv_per_stage`` other than 2, dropout,
``nonlin_first``, normalizations other than instance norm, strides other than 1 or 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dgst_monai.files import read_json
from dgst_monai.networks.nnunet_layout import NNUNetDynUNet
from dgst_monai.networks.planner import DynUNetPlan
from dgst_monai.normalization import normalization_from_nnunet_plans, save_normalization

__all__ = [
    "NNUNetDynUNet",
    "NNUNetImportError",
    "bundle_to_nnunet_axes",
    "export_nnunet",
    "import_nnunet",
]

Axes = Literal["nnunet", "bundle"]


class NNUNetImportError(ValueError):
    """An nnU-Net model folder, plans or checkpoint that cannot be imported; the message names file and problem."""


def bundle_to_nnunet_axes(transpose_forward: Sequence[int]) -> tuple[int, int, int]:
    """Spatial permutation from nnU-Net's array axes to MONAI's (x, y, z): bundle axis b is nnU-Net axis ``p[b]``.

    nnU-Net axis ``a`` is SimpleITK array axis ``transpose_forward[a]``, which is MONAI/NiBabel axis
    ``2 - transpose_forward[a]``.

    Example::

        p = bundle_to_nnunet_axes([0, 1, 2])  # (2, 1, 0)
        x_bundle = x_nnunet.permute(0, 1, *[2 + a for a in p])
        x_nnunet = x_bundle.permute(0, 1, *[2 + p.index(a) for a in range(3)])
    """
    tf = [int(a) for a in transpose_forward]
    if sorted(tf) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of (0, 1, 2), got {list(transpose_forward)}")
    perm = [0, 0, 0]
    for a, sitk_axis in enumerate(tf):
        perm[2 - sitk_axis] = a
    return perm[0], perm[1], perm[2]


@dataclass(frozen=True)
class _ImportedModel:
    """What an nnU-Net model folder resolves to, in nnU-Net's axis order."""

    kwargs: dict[str, Any]  # NNUNetDynUNet keyword arguments
    weights: dict[str, torch.Tensor]  # DynUNet parameter name -> tensor (every seg layer mapped)
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    transpose_forward: tuple[int, ...]
    configuration: str
    trainer_name: str
    checkpoint_path: Path


def import_nnunet(
    model_folder: str | Path,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    deep_supervision: bool = False,
    *,
    deep_supr_num: int | None = None,
    axes: Axes = "nnunet",
    configuration: str | None = None,
) -> NNUNetDynUNet:
    """Load a trained nnU-Net v2 PlainConvUNet as a MONAI DynUNet (:class:`NNUNetDynUNet`) with equal outputs.

    Args:
        model_folder: nnU-Net's trained-model folder (holds ``plans.json``, ``dataset.json``, ``fold_*``).
        fold: fold number, or ``"all"``.
        checkpoint: checkpoint file name inside ``fold_<fold>``.
        deep_supervision: build the deep-supervision heads (training output stacks them on dim 1).
        deep_supr_num: extra heads with deep supervision; None keeps all of nnU-Net's (``n_stages - 2``).
        axes: ``"nnunet"``: input in nnU-Net's preprocessed array order; ``"bundle"``: weights permuted to
            take MONAI's ``(x, y, z)`` after ``Orientationd("RAS")`` (see the module docstring).
        configuration: plans configuration to build; None takes the checkpoint's ``init_args``.

    Returns:
        The network in eval mode, on CPU.

    Raises:
        NNUNetImportError: missing files or folds, an unsupported architecture, or weights that do not match
            the plans; the message names the file and the problem.

    Example::

        net = import_nnunet("nnUNet_results/Dataset100_LN/nnUNetTrainer__nnUNetPlans__3d_fullres", fold=0)
        logits = net(image_zyx)  # (1, 2, *patch) in nnU-Net's array order
    """
    model = _load(model_folder, fold, checkpoint, configuration)
    return _build(model, deep_supervision, deep_supr_num, axes)


def export_nnunet(
    model_folder: str | Path,
    output: str | Path,
    fold: int | str = 0,
    *,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    deep_supr_num: int | None = None,
    axes: Axes = "bundle",
) -> Path:
    """Save an nnU-Net v2 model as an ``ln_ct_dynunet`` bundle checkpoint plus its network override JSON.

    Writes ``output`` (a ``.pt`` state dict the bundle's ``CheckpointLoader`` loads, strict), next to it
    ``normalization.json`` (the plans' foreground intensity properties: the model's own CT normalisation) and
    ``<stem>_override.json``: the bundle's ``plan`` (a :class:`~dgst_monai.networks.planner.DynUNetPlan` with
    the model's spacing, patch, kernels, strides, filters, norm, activation and biases, in the bundle's
    ``(x, y, z)`` order with ``axes="bundle"``, the default), the channels, ``resampling: "nnunet"`` and
    ``orientation: "file"``: the inference config then resamples scans with nnU-Net's rule
    (:class:`~dgst_monai.transforms.ResampleAndNormalized`) and keeps their voxel order, as nnU-Net does, so
    that the masks are nnU-Net's own. The bundle builds its own network class from the plan. Merge it last::

        python -m monai.bundle run --config_file \\
            "['configs/train.json','configs/finetune.json','models/model_override.json']" \\
            --foundation_checkpoint models/model.pt

    Deep supervision: the state dict has ``deep_supr_num`` heads; None gives ``max(1, n_stages - 3)``, the
    outputs nnU-Net's loss actually trains (it weights the lowest-resolution one 0).

    Args:
        model_folder: nnU-Net's trained-model folder.
        output: checkpoint path (``.pt``); a directory gets ``model.pt`` inside.
        fold: fold number, or ``"all"``.
        checkpoint: checkpoint file name inside ``fold_<fold>``.
        configuration: plans configuration; None takes the checkpoint's.
        deep_supr_num: deep-supervision heads to keep.
        axes: ``"bundle"`` (default) or ``"nnunet"`` (then the bundle must feed nnU-Net's axis order itself).

    Returns:
        The checkpoint path.

    Example::

        ckpt = export_nnunet("nnUNet_results/Dataset100_LN/nnUNetTrainer__nnUNetPlans__3d_fullres", "models")
        # models/model.pt and models/model_override.json
    """
    model = _load(model_folder, fold, checkpoint, configuration)
    n_stages = len(model.kwargs["strides"])
    if deep_supr_num is None:
        deep_supr_num = min(max(1, n_stages - 3), n_stages - 2)
    net = _build(model, True, deep_supr_num, axes)
    output = Path(output)
    if output.is_dir() or not output.suffix:
        output = output / "model.pt"
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), output)

    override = _bundle_override(model, net, model_folder, fold, deep_supr_num, axes)
    # the model's CT normalisation travels with its weights, as for every bundle checkpoint
    save_normalization(output.parent, normalization_from_nnunet_plans(Path(model_folder) / "plans.json"))
    override_path = output.with_name(f"{output.stem}_override.json")
    override_path.write_text(json.dumps(override, indent=4) + "\n", encoding="utf-8")
    return output


def _bundle_override(
    model: _ImportedModel, net: NNUNetDynUNet, model_folder: str | Path, fold: int | str, deep_supr_num: int,
    axes: Axes,
) -> dict[str, Any]:
    """The ``ln_ct_dynunet`` override of an exported model: its source, plan, channels, resampling, orientation."""
    perm = bundle_to_nnunet_axes(model.transpose_forward) if axes == "bundle" else (0, 1, 2)
    norm_name, norm_args = model.kwargs["norm_name"]
    act_name, act_args = model.kwargs["act_name"]
    # the bundle's own network class, rebuilt from this plan: only the topology changes, never the class
    plan = DynUNetPlan(
        patch_size=tuple(model.patch_size[a] for a in perm),
        kernel_size=tuple(tuple(k) for k in net.kernel_size),
        strides=tuple(tuple(s) for s in net.strides),
        upsample_kernel_size=tuple(tuple(u) for u in net.upsample_kernel_size),
        filters=tuple(net.filters),
        deep_supr_num=deep_supr_num,
        spacing=tuple(model.spacing[a] for a in perm),
        norm_name=(norm_name, dict(norm_args)),
        act_name=(act_name, dict(act_args)),
        conv_bias=net.conv_bias,
    )
    return {
        "nnunet_source": {
            "model_folder": str(Path(model_folder).resolve()),
            "fold": fold,
            "checkpoint": str(model.checkpoint_path.resolve()),
            "configuration": model.configuration,
            "trainer_name": model.trainer_name,
            "transpose_forward": list(model.transpose_forward),
            "axes": axes,
        },
        "plan": plan.to_config(),
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        # inference resamples as nnU-Net trained the model: normalise, then cubic in-plane, nearest thick slice
        "resampling": "nnunet",
        # and predicts in the file's own voxel order, as nnU-Net does (no reorientation to RAS)
        "orientation": "file",
    }


# --------------------------------------------------------------------------------------------------------------
# reading the model folder


def _load(model_folder: str | Path, fold: int | str, checkpoint: str, configuration: str | None) -> _ImportedModel:
    folder = Path(model_folder)
    if not folder.is_dir():
        raise NNUNetImportError(f"{folder}: not a directory (expected an nnU-Net v2 trained-model folder)")
    plans_path = folder / "plans.json"
    dataset_path = folder / "dataset.json"
    for path in (plans_path, dataset_path):
        if not path.is_file():
            raise NNUNetImportError(f"{path}: missing; an nnU-Net v2 model folder holds plans.json and dataset.json")
    plans = _read_json(plans_path)
    dataset = _read_json(dataset_path)

    fold_dir = folder / f"fold_{fold}"
    if not fold_dir.is_dir():
        folds = sorted(p.name for p in folder.glob("fold_*") if p.is_dir())
        raise NNUNetImportError(f"{fold_dir}: fold {fold!r} not found in {folder}; available: {folds or 'none'}")
    ckpt_path = fold_dir / checkpoint
    if not ckpt_path.is_file():
        present = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise NNUNetImportError(f"{ckpt_path}: checkpoint not found; {fold_dir} has {present or 'no .pth files'}")
    try:
        # nnU-Net's checkpoints pickle more than tensors (logging, init_args): as nnU-Net, trust the folder
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        raise NNUNetImportError(f"{ckpt_path}: cannot be read by torch.load ({error})") from error
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("network_weights"), Mapping):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise NNUNetImportError(f"{ckpt_path}: not an nnU-Net v2 checkpoint (no 'network_weights'; has {keys})")
    trainer_name = str(ckpt.get("trainer_name", "unknown trainer"))
    if configuration is None:
        configuration = (ckpt.get("init_args") or {}).get("configuration")
        if configuration is None:
            raise NNUNetImportError(
                f"{ckpt_path}: init_args has no 'configuration'; pass configuration= (e.g. '3d_fullres')"
            )

    config = _resolve_configuration(plans, configuration, plans_path)
    arch = _architecture(config, configuration, plans_path)
    weights = _strip_prefixes(ckpt["network_weights"])
    in_channels, out_channels = _channels(dataset, config, dataset_path)
    kwargs = _dynunet_kwargs(arch, in_channels, out_channels, configuration, plans_path, trainer_name)
    mapped = _map_weights(weights, kwargs, ckpt_path, plans_path, trainer_name)

    dims = len(kwargs["strides"][0])
    for key in ("spacing", "patch_size"):
        if len(config.get(key) or ()) != dims:
            raise NNUNetImportError(
                f"{plans_path}: configuration {configuration!r} needs a {dims}-entry {key!r}, got {config.get(key)!r}"
            )
    spacing = tuple(float(v) for v in config["spacing"])
    patch_size = tuple(int(v) for v in config["patch_size"])
    transpose_forward = tuple(int(a) for a in plans.get("transpose_forward", range(dims)))
    return _ImportedModel(
        kwargs, mapped, spacing, patch_size, transpose_forward, configuration, trainer_name, ckpt_path
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = read_json(path, "nnU-Net file")
    except (OSError, ValueError) as error:
        raise NNUNetImportError(str(error)) from error
    if not isinstance(content, dict):
        raise NNUNetImportError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _resolve_configuration(plans: Mapping[str, Any], name: str, plans_path: Path) -> dict[str, Any]:
    configurations = plans.get("configurations")
    if not isinstance(configurations, Mapping):
        raise NNUNetImportError(f"{plans_path}: no 'configurations' (not an nnU-Net v2 plans file)")
    chain: list[str] = []
    while True:
        if name not in configurations:
            raise NNUNetImportError(
                f"{plans_path}: configuration {name!r} not found; it has {sorted(configurations)}"
            )
        if name in chain:
            raise NNUNetImportError(f"{plans_path}: circular inherits_from: {' -> '.join([*chain, name])}")
        chain.append(name)
        parent = configurations[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    resolved: dict[str, Any] = {}
    for link in reversed(chain):  # parent first; a child's keys replace its parent's whole (as nnU-Net)
        resolved.update(configurations[link])
    return resolved


def _architecture(config: Mapping[str, Any], name: str, plans_path: Path) -> dict[str, Any]:
    if "architecture" in config:
        arch = config["architecture"]
        if not isinstance(arch, Mapping) or "network_class_name" not in arch or "arch_kwargs" not in arch:
            raise NNUNetImportError(
                f"{plans_path}: configuration {name!r}: 'architecture' needs network_class_name and arch_kwargs"
            )
        return {"network_class_name": arch["network_class_name"], "arch_kwargs": dict(arch["arch_kwargs"])}
    if "UNet_class_name" not in config:
        raise NNUNetImportError(f"{plans_path}: configuration {name!r} has no 'architecture'")
    # plans of nnU-Net < 2.4: the same information under flat keys (nnU-Net converts them the same way)
    try:
        n_stages = len(config["n_conv_per_stage_encoder"])
        features = [
            min(config["UNet_base_num_features"] * 2**s, config["unet_max_num_features"]) for s in range(n_stages)
        ]
        dims = len(config["patch_size"])
        return {
            "network_class_name": config["UNet_class_name"],
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": features,
                "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
                "kernel_sizes": config["conv_kernel_sizes"],
                "strides": config["pool_op_kernel_sizes"],
                "n_conv_per_stage": config["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
                "conv_bias": True,
                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
                "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
        }
    except KeyError as error:
        raise NNUNetImportError(f"{plans_path}: configuration {name!r} (old plans format) lacks {error}") from None


def _strip_prefixes(weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel and torch.compile wrappers, which nnU-Net normally removes before saving
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _channels(dataset: Mapping[str, Any], config: Mapping[str, Any], dataset_path: Path) -> tuple[int, int]:
    channels = dataset.get("channel_names", dataset.get("modality"))
    labels = dataset.get("labels")
    if not isinstance(channels, Mapping) or not isinstance(labels, Mapping) or not channels:
        raise NNUNetImportError(f"{dataset_path}: needs 'channel_names' and 'labels' (nnU-Net v2 dataset.json)")
    values = {k: v for k, v in labels.items() if k != "ignore"}
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in values.values())
    if has_regions:  # region-based training: one sigmoid output per foreground region
        out_channels = sum(1 for k in values if k != "background")
    else:
        flat = {int(x) for v in values.values() for x in (v if isinstance(v, (list, tuple)) else [v])}
        out_channels = len(flat)
    in_channels = len(channels)
    if config.get("previous_stage") is not None:  # cascade: one-hot of the low-res prediction is appended
        in_channels += out_channels - 1
    return in_channels, out_channels


def _expand(value: Any, n_stages: int, dims: int, what: str, plans_path: Path) -> list[list[int]]:
    """Per-stage per-axis integers from nnU-Net's int / per-stage int / per-stage list forms."""
    if isinstance(value, int):
        value = [value] * n_stages
    if not isinstance(value, (list, tuple)) or len(value) != n_stages:
        raise NNUNetImportError(f"{plans_path}: {what} must have one entry per stage ({n_stages}), got {value!r}")
    out = []
    for entry in value:
        entry = [entry] * dims if isinstance(entry, int) else list(entry)
        if len(entry) != dims or not all(isinstance(v, int) and v >= 1 for v in entry):
            raise NNUNetImportError(f"{plans_path}: {what} entries must be {dims} positive integers, got {value!r}")
        out.append(entry)
    return out


def _class_tail(name: Any) -> str:
    return str(name).rsplit(".", 1)[-1] if name is not None else "None"


def _dynunet_kwargs(
    arch: Mapping[str, Any],
    in_channels: int,
    out_channels: int,
    configuration: str,
    plans_path: Path,
    trainer_name: str,
) -> dict[str, Any]:
    """NNUNetDynUNet keyword arguments for a PlainConvUNet architecture, or a clear refusal."""
    where = f"{plans_path}: configuration {configuration!r}"
    _check_network_class(arch["network_class_name"], where, trainer_name)
    kw = arch["arch_kwargs"]
    features, kernels, strides = _stages(kw, where, plans_path)
    norm_args, act = _norm_and_activation(kw, where)
    conv_bias = bool(kw.get("conv_bias", False))  # PlainConvUNet's own default; nnU-Net's plans say True
    return dict(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=features,
        norm_name=("INSTANCE", norm_args),
        act_name=act,
        conv_bias=conv_bias,
        trans_bias=conv_bias,
    )


def _check_network_class(class_name: str, where: str, trainer_name: str) -> None:
    """Refuse every network class but PlainConvUNet (ResEnc with its reason)."""
    network_class = _class_tail(class_name)
    if network_class == "ResidualEncoderUNet":
        raise NNUNetImportError(
            f"{where}: network {class_name} (nnU-Net ResEnc) is not supported: its stages hold "
            "several residual blocks with average-pool shortcuts and a stem, which MONAI's DynUNet cannot hold; "
            "only PlainConvUNet (nnU-Net's default 3d_fullres) can be imported"
        )
    if network_class != "PlainConvUNet":
        raise NNUNetImportError(
            f"{where}: network class {class_name!r} (trainer {trainer_name}) is not supported; "
            "only dynamic_network_architectures' PlainConvUNet can be imported"
        )


def _need(kw: Mapping[str, Any], key: str, where: str) -> Any:
    """``kw[key]``, or an error naming the missing key."""
    if key not in kw:
        raise NNUNetImportError(f"{where}: arch_kwargs lacks {key!r}")
    return kw[key]


def _stages(
    kw: Mapping[str, Any], where: str, plans_path: Path
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Features, kernels and strides per stage of 3D arch_kwargs that DynUNet can hold, or a clear refusal."""
    conv_op = _class_tail(_need(kw, "conv_op", where))
    if conv_op != "Conv3d":
        raise NNUNetImportError(f"{where}: conv_op {kw['conv_op']} is not supported (3D configurations only)")
    n_stages = int(_need(kw, "n_stages", where))
    if n_stages < 3:
        raise NNUNetImportError(f"{where}: {n_stages} stages; MONAI's DynUNet needs at least 3 (two poolings)")
    features = _need(kw, "features_per_stage", where)
    features = [int(features)] * n_stages if isinstance(features, int) else [int(f) for f in features]
    if len(features) != n_stages:
        raise NNUNetImportError(f"{where}: features_per_stage has {len(features)} entries for {n_stages} stages")
    kernels = _expand(_need(kw, "kernel_sizes", where), n_stages, 3, "kernel_sizes", plans_path)
    strides = _expand(_need(kw, "strides", where), n_stages, 3, "strides", plans_path)
    for key, count in (("n_conv_per_stage", n_stages), ("n_conv_per_stage_decoder", n_stages - 1)):
        value = _need(kw, key, where)
        value = [value] * count if isinstance(value, int) else list(value)
        if value != [2] * count:
            raise NNUNetImportError(
                f"{where}: {key}={value} is not supported; MONAI's DynUNet blocks have exactly 2 convolutions"
            )
    for stage, (kernel, stride) in enumerate(zip(kernels, strides)):
        for k, s in zip(kernel, stride):
            # nnU-Net pads (k - 1) // 2, DynUNet (k - s + 1) // 2: equal for odd kernels and strides 1 or 2
            if k % 2 == 0 or s > 2:
                raise NNUNetImportError(
                    f"{where}: stage {stage} kernel {kernel} / stride {stride} not supported (odd kernels and "
                    "strides of 1 or 2 only, where nnU-Net's and DynUNet's paddings agree)"
                )
    return features, kernels, strides


def _norm_and_activation(
    kw: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], tuple[str, dict[str, Any]]]:
    """Instance-norm arguments and DynUNet activation of arch_kwargs without dropout, conv-nonlin-norm order
    or other norms and nonlinearities (those are refused)."""
    if kw.get("dropout_op") is not None:
        raise NNUNetImportError(f"{where}: dropout_op {kw['dropout_op']} is not supported (nnU-Net's default is None)")
    if kw.get("nonlin_first", False):
        raise NNUNetImportError(f"{where}: nonlin_first=True (conv-nonlin-norm) is not supported")
    if _class_tail(kw.get("norm_op")) != "InstanceNorm3d":
        raise NNUNetImportError(f"{where}: norm_op {kw.get('norm_op')} is not supported (InstanceNorm3d only)")
    norm_kwargs = dict(kw.get("norm_op_kwargs") or {})
    if norm_kwargs.get("track_running_stats", False):
        raise NNUNetImportError(f"{where}: InstanceNorm3d with track_running_stats=True is not supported")
    norm_args = {"affine": bool(norm_kwargs.get("affine", False)), "eps": float(norm_kwargs.get("eps", 1e-5))}
    nonlin = _class_tail(kw.get("nonlin"))
    nonlin_kwargs = dict(kw.get("nonlin_kwargs") or {})
    if nonlin == "LeakyReLU":
        act = ("leakyrelu", {"negative_slope": float(nonlin_kwargs.get("negative_slope", 0.01)), "inplace": True})
    elif nonlin == "ReLU":
        act = ("relu", {"inplace": True})
    else:
        raise NNUNetImportError(f"{where}: nonlin {kw.get('nonlin')} is not supported (LeakyReLU or ReLU)")
    return norm_args, act


def _expected_names(n_stages: int, conv_bias: bool, affine: bool) -> dict[str, str]:
    """Canonical PlainConvUNet tensor name -> NNUNetDynUNet parameter name (every seg layer included)."""
    conv_keys = ("weight", "bias") if conv_bias else ("weight",)
    norm_keys = ("weight", "bias") if affine else ()
    names: dict[str, str] = {}

    def block(src: str, dst: str) -> None:
        for c in range(2):
            for key in conv_keys:
                names[f"{src}.convs.{c}.conv.{key}"] = f"{dst}.conv{c + 1}.conv.{key}"
            for key in norm_keys:
                names[f"{src}.convs.{c}.norm.{key}"] = f"{dst}.norm{c + 1}.{key}"

    for s in range(n_stages):
        dst = "input_block" if s == 0 else "bottleneck" if s == n_stages - 1 else f"downsamples.{s - 1}"
        block(f"encoder.stages.{s}.0", dst)
    for d in range(n_stages - 1):  # decoder stage 0 is the lowest resolution, as DynUNet's upsamples[0]
        block(f"decoder.stages.{d}", f"upsamples.{d}.conv_block")
        for key in conv_keys:
            names[f"decoder.transpconvs.{d}.{key}"] = f"upsamples.{d}.transp_conv.conv.{key}"
        level = n_stages - 2 - d  # 0 = full resolution
        head = "output_block" if level == 0 else f"deep_supervision_heads.{level - 1}"
        for key in ("weight", "bias"):
            names[f"decoder.seg_layers.{d}.{key}"] = f"{head}.conv.conv.{key}"
    return names


def _is_alias(name: str) -> bool:
    # ConvDropoutNormReLU registers conv and norm twice (as attributes and in all_modules), and the decoder
    # keeps a reference to the encoder: state_dict() lists those tensors again under these names
    return ".all_modules." in name or name.startswith("decoder.encoder.")


def _map_weights(
    weights: Mapping[str, torch.Tensor],
    kwargs: Mapping[str, Any],
    ckpt_path: Path,
    plans_path: Path,
    trainer_name: str,
) -> dict[str, torch.Tensor]:
    n_stages = len(kwargs["strides"])
    affine = kwargs["norm_name"][1]["affine"]
    names = _expected_names(n_stages, kwargs["conv_bias"], affine)
    unexpected = sorted(k for k in weights if k not in names and not _is_alias(k))
    missing = sorted(k for k in names if k not in weights)
    if unexpected or missing:
        raise NNUNetImportError(
            f"{ckpt_path}: network_weights do not match the PlainConvUNet of {plans_path} "
            f"(trainer {trainer_name}): missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    expected_shapes = _expected_shapes(kwargs)
    mapped: dict[str, torch.Tensor] = {}
    for src, dst in names.items():
        tensor = weights[src]
        if not isinstance(tensor, torch.Tensor):
            raise NNUNetImportError(f"{ckpt_path}: {src} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != expected_shapes[dst]:
            raise NNUNetImportError(
                f"{ckpt_path}: tensor {src} has shape {tuple(tensor.shape)} but {plans_path} (with dataset.json's "
                f"channels) implies {expected_shapes[dst]}: the checkpoint was not trained with these plans"
            )
        mapped[dst] = tensor.detach().to(torch.float32).clone()
    return mapped


def _expected_shapes(kwargs: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the full-deep-supervision NNUNetDynUNet these kwargs build (built on the meta device)."""
    n_stages = len(kwargs["strides"])
    with torch.device("meta"):
        net = NNUNetDynUNet(**{**kwargs, "deep_supervision": True, "deep_supr_num": n_stages - 2})
    return {name: tuple(p.shape) for name, p in net.named_parameters()}


def _build(model: _ImportedModel, deep_supervision: bool, deep_supr_num: int | None, axes: Axes) -> NNUNetDynUNet:
    if axes not in ("nnunet", "bundle"):
        raise ValueError(f"axes must be 'nnunet' or 'bundle', got {axes!r}")
    n_stages = len(model.kwargs["strides"])
    if deep_supr_num is None:
        deep_supr_num = n_stages - 2
    if deep_supervision and not 1 <= deep_supr_num <= n_stages - 2:
        raise ValueError(
            f"deep_supr_num must be in [1, {n_stages - 2}] for this {n_stages}-stage network, got {deep_supr_num}"
        )
    kwargs = dict(model.kwargs)
    weights = dict(model.weights)
    if axes == "bundle":
        perm = bundle_to_nnunet_axes(model.transpose_forward)
        for key in ("kernel_size", "strides", "upsample_kernel_size"):
            kwargs[key] = [[entry[a] for a in perm] for entry in kwargs[key]]
        spatial = [2 + a for a in perm]
        weights = {k: (w.permute(0, 1, *spatial).contiguous() if w.dim() == 5 else w) for k, w in weights.items()}
    net = NNUNetDynUNet(**kwargs, deep_supervision=deep_supervision, deep_supr_num=max(1, deep_supr_num))
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    # the heads DynUNet does not hold (deep supervision off, or fewer heads) are left out on purpose
    return net.eval()
