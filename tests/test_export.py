"""TorchScript export of both bundles (``ckpt_export``) and the model-zoo shape check (``verify_net_in_out``).

The checkpoint is what training writes (for DynUNet: with deep-supervision heads); the export network is the
inference config's ``network_def``; the exported model must give the training network's eval-mode output.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from bundle_support import BUNDLES, TINY_NETWORK
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

#: Patch of the round trip and the traced SwinUNETR (the tiny networks' patch size).
PATCH = {"ln_ct_dynunet": (32, 32, 16), "ln_ct_swinunetr": (64, 64, 32)}


def _network(bundle: str, config: str, **overrides) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / f"{config}.json"))
    for key, value in {**TINY_NETWORK[bundle], **overrides}.items():
        parser[key] = value
    return parser.get_parsed_content("network_def")


def _training_checkpoint(bundle: str, path) -> torch.nn.Module:
    torch.manual_seed(0)
    net = _network(bundle, "train")
    torch.save(net.state_dict(), path)
    return net.eval()


def _export_command(bundle: str, tmp_path, *extra: str) -> list[str]:
    """``python -m monai.bundle ckpt_export network_def ...`` as documented, with the tiny-network overrides."""
    root = BUNDLES / bundle
    overrides = [a for k, v in TINY_NETWORK[bundle].items() for a in (f"--{k}", str(v).replace(" ", ""))]
    return [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(tmp_path / "model.ts"), "--ckpt_file", str(tmp_path / "model.pt"),
        "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(root / "configs" / "inference.json"), "--bundle_root", str(root), *overrides, *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("bundle", ["ln_ct_dynunet", "ln_ct_swinunetr"])
def test_ckpt_export_round_trip_equals_the_checkpoint(bundle, tmp_path):
    """ckpt_export loads the training checkpoint strictly into the inference network and model.ts gives the
    training network's output. DynUNet is scripted (in-process API); SwinUNETR is traced, through the command
    line as documented (``--use_trace true``), at the patch the sliding window feeds it."""
    trained = _training_checkpoint(bundle, tmp_path / "model.pt")
    if bundle == "ln_ct_swinunetr":
        shape = str([1, 1, *PATCH[bundle]]).replace(" ", "")
        command = _export_command(bundle, tmp_path, "--use_trace", "true", "--input_shape", shape)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        root = BUNDLES / bundle
        ckpt_export(
            net_id="network_def",
            filepath=str(tmp_path / "model.ts"),
            ckpt_file=str(tmp_path / "model.pt"),
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            bundle_root=str(root),
            **TINY_NETWORK[bundle],
        )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(2, 1, *PATCH[bundle])  # batch 2, as the sliding window (sw_batch_size 2) feeds it
    with torch.no_grad():
        expected, actual = trained(x), exported(x)
    assert actual.shape == (2, 2, *PATCH[bundle])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_verify_net_in_out_dynunet_at_the_shipped_patch():
    """The shipped metadata's input/output description fits the inference network (paper topology, thin filters)."""
    root = BUNDLES / "ln_ct_dynunet"
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device="cpu",
        filters=[2, 2, 2, 2, 2, 2],  # the paper's six-level topology and patch, few channels to stay fast
    )


def test_verify_net_in_out_swinunetr():
    """SwinUNETR: channels and dtype of the shipped metadata, at a small patch (the shipped one is checked for
    divisibility by 32, SwinUNETR's only constraint)."""
    root = BUNDLES / "ln_ct_swinunetr"
    shipped = ConfigParser.load_config_file(str(root / "configs" / "metadata.json"))
    assert all(s % 32 == 0 for s in shipped["network_data_format"]["inputs"]["image"]["spatial_shape"])
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device="cpu",
        **TINY_NETWORK["ln_ct_swinunetr"],
        **{"_meta_#network_data_format#inputs#image#spatial_shape": list(PATCH["ln_ct_swinunetr"])},
    )
