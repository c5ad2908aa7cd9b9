"""A pure, light core: what each import loads (checked in fresh interpreters), the registry's lazy providers,
and MONAI's network layouts known without any registration."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from torch import nn

from dgst_monai.methods import (
    METHOD_PROVIDERS,
    METHODS,
    FineTuningMethod,
    MethodRegistry,
    get_method,
    register_method,
)

HEAVY = ("ignite", "monai", "peft", "dgst_monai.networks", "dgst_monai.handlers")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON object as its last line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


LOADED = "sorted({m.split('.')[0] if not m.startswith('dgst_monai') else m for m in sys.modules})"


def test_core_imports_load_no_ignite_monai_or_network_builder():
    """import dgst_monai loads nothing (not even torch); dgst_monai.sparsity / .methods / .networks load no
    Ignite, MONAI, peft, network builder or handler; the registry still names lora, adapter, spatial_adapter."""
    out = _fresh(
        "import json, sys\n"
        "import dgst_monai\n"
        f"bare = {LOADED}\n"
        "import dgst_monai.sparsity\n"
        f"sparsity = {LOADED}\n"
        "import dgst_monai.methods, dgst_monai.networks\n"
        f"core = {LOADED}\n"
        "names = list(dgst_monai.METHODS)\n"
        f"after_names = {LOADED}\n"
        "print(json.dumps(dict(bare=bare, sparsity=sparsity, core=core, names=names, after_names=after_names)))"
    )
    assert "torch" not in out["bare"] and [m for m in out["bare"] if m.startswith("dgst_monai")] == ["dgst_monai"]
    for key in ("sparsity", "core", "after_names"):
        heavy = [m for m in out[key] if m.startswith(HEAVY) and m != "dgst_monai.networks"]
        assert heavy == [], (key, heavy)
    assert "dgst_monai.networks" not in out["sparsity"]
    assert not [m for m in out["core"] if m.startswith("dgst_monai.networks.")]  # the package, none of its modules
    assert {"lora", "adapter", "spatial_adapter", "dgst"} <= set(out["names"])


@pytest.fixture(scope="module")
def fresh_use() -> dict:
    """One fresh interpreter that imports MONAI's networks and dgst_monai.roles only, describes them, then
    uses the lazily provided methods and attributes."""
    return _fresh(
        "import json, sys\n"
        "from monai.networks.nets import DynUNet, SwinUNETR\n"
        "from monai.networks.blocks import UnetOutBlock\n"
        "import torch.nn as nn\n"
        "import dgst_monai\n"
        "from dgst_monai.roles import describe_parameters\n"
        "dyn = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], deep_supervision=True,\n"
        "              deep_supr_num=1)\n"
        "swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))\n"
        "loose = nn.Sequential(nn.Conv3d(1, 4, 3), UnetOutBlock(3, 4, 2))\n"
        "def summary(net):\n"
        "    return {n: [i.part, i.head] for n, i in describe_parameters(net).items()}\n"
        "roles = dict(dyn=summary(dyn), swin=summary(swin), loose=summary(loose),\n"
        "             networks='dgst_monai.networks' in sys.modules)\n"
        "lora = dgst_monai.get_method('lora')\n"
        "spatial = dgst_monai.get_method('spatial_adapter')\n"
        "handler = dgst_monai.DGSTHandler(method='lora')\n"
        "rebuild = dgst_monai.networks.for_checkpoint\n"
        "try:\n"
        "    dgst_monai.no_such_thing\n"
        "    missing = False\n"
        "except AttributeError:\n"
        "    missing = True\n"
        "use = dict(lora=lora.label, prepare=lora.prepare is not None, spatial=spatial.label,\n"
        "    handler=type(handler).__name__, rebuild=rebuild.__name__, missing=missing,\n"
        "    in_dir='DGSTHandler' in dir(dgst_monai), adapters='dgst_monai.networks.adapters' in sys.modules)\n"
        "print(json.dumps(dict(roles=roles, use=use)))"
    )


def test_provided_methods_and_handler_resolve_on_first_use(fresh_use):
    """From an interpreter that only imported dgst_monai: get_method('lora') imports its module and works,
    dgst_monai.DGSTHandler (a FineTuningHandler) and dgst_monai.networks.for_checkpoint resolve, an unknown
    attribute is an error."""
    assert fresh_use["use"] == {
        "lora": "LoRA",
        "prepare": True,
        "spatial": "Spatial Adapter",
        "handler": "FineTuningHandler",
        "rebuild": "for_checkpoint",
        "missing": True,
        "in_dir": True,
        "adapters": True,
    }


def test_monai_layouts_are_known_without_importing_dgst_monai_networks(fresh_use):
    """describe_parameters splits DynUNet and SwinUNETR into encoder / decoder / heads with nothing registered
    (dgst_monai.networks not imported); MONAI's head block is a head wherever it sits."""
    out = fresh_use["roles"]
    assert out["networks"] is False
    dyn = out["dyn"]
    assert dyn["input_block.conv1.conv.weight"] == ["encoder", False]
    assert dyn["bottleneck.conv2.conv.weight"] == ["encoder", False]
    assert dyn["upsamples.0.transp_conv.conv.weight"] == ["decoder", False]
    assert dyn["output_block.conv.conv.weight"] == ["decoder", True]
    assert dyn["deep_supervision_heads.0.conv.conv.weight"] == ["decoder", True]
    swin = out["swin"]
    assert all(v[0] == "encoder" for k, v in swin.items() if k.startswith(("swinViT.", "encoder")))
    assert all(v[0] == "decoder" for k, v in swin.items() if k.startswith(("decoder", "out.")))
    assert {k for k, v in swin.items() if v[1]} == {k for k in swin if k.startswith("out.")}
    assert out["loose"] == {
        "0.weight": [None, False],
        "0.bias": [None, False],
        "1.conv.conv.weight": [None, True],
        "1.conv.conv.bias": [None, True],
    }


def test_registry_lists_providers_without_importing_and_takes_user_methods():
    """Provided names are known (in order) before their modules load; a user method registers once; a taken
    name is refused. (On a registry of its own, so that the session's METHODS stays the shipped set.)"""
    assert [name for name in METHODS if name in METHOD_PROVIDERS] == list(METHOD_PROVIDERS)
    registry = MethodRegistry([get_method("full")], providers={"lora": "dgst_monai.networks.adapters"})
    assert list(registry) == ["full", "lora"] and len(registry) == 2
    method = FineTuningMethod("heads_only", "Heads", lambda info: info.head)
    assert registry.register(method) is method and registry["heads_only"] is method
    assert list(registry) == ["full", "lora", "heads_only"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register(FineTuningMethod("heads_only", "Heads again", lambda info: True))
    with pytest.raises(ValueError, match="already registered"):
        register_method(FineTuningMethod("full", "Full again", lambda info: True))
    with pytest.raises(ValueError, match="no parameter"):
        method.apply(nn.Sequential(nn.Conv3d(1, 2, 3)))
