"""Multi-process fine-tuning through the bundle: ``torchrun --nproc_per_node=2`` on CPU (gloo), DGST over DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from bundle_support import BUNDLES, TINY_NETWORK
from helpers import free_port
from monai.bundle import ConfigParser

from dgst_monai.data.datalists import ct_normalization
from dgst_monai.normalization import save_normalization

ITERATIONS = 2

pytestmark = pytest.mark.slow  # torchrun with two ranks


def test_torchrun_dgst_finetuning_keeps_ranks_identical(tiny_ct, tmp_path):
    """Two ranks fine-tune with strict DGST (multi_gpu_train.json over train + cpu_small + finetune) on different
    cases; both end with bit-identical weights, equal to rank 0's saved model, and DGST held on every rank."""
    bundle = BUNDLES / "ln_ct_dynunet"
    net = TINY_NETWORK["ln_ct_dynunet"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    for key, value in net.items():
        parser[key] = value
    torch.manual_seed(0)
    foundation = parser.get_parsed_content("network_def").state_dict()
    # as training leaves it: the weights and, beside them, the normalisation fine-tuning keeps
    (tmp_path / "foundation").mkdir()
    torch.save(foundation, tmp_path / "foundation" / "model.pt")
    save_normalization(tmp_path / "foundation", ct_normalization(tiny_ct.hn))
    # test-only overlay: after training, every rank dumps its own (unwrapped) network
    dump = tmp_path / "dump_per_rank.json"
    save = "$torch.save(@local_network.state_dict(), @ckpt_dir + '/rank' + str(dist.get_rank()) + '.pt')"
    dump.write_text(json.dumps({"+run": [save]}), encoding="utf-8")
    configs = [str(bundle / "configs" / f"{n}.json") for n in ("train", "cpu_small", "finetune", "multi_gpu_train")]
    overrides = {
        "datalist": tiny_ct.mediastinum,
        "foundation_checkpoint": str(tmp_path / "foundation" / "model.pt"),
        "ckpt_dir": str(tmp_path / "tuned"),
        "method": "dgst",
        "shots": 2,  # one case per rank
        "batch_size": 1,
        "max_epochs": 1,
        "iterations_per_epoch": ITERATIONS,
        **net,
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "monai.bundle", "run",
        "--config_file", json.dumps([*configs, str(dump)]),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--bundle_root", str(bundle),
        *[a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))],
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    rank0 = torch.load(tmp_path / "tuned" / "rank0.pt", map_location="cpu", weights_only=True)
    rank1 = torch.load(tmp_path / "tuned" / "rank1.pt", map_location="cpu", weights_only=True)
    saved = torch.load(tmp_path / "tuned" / "model.pt", map_location="cpu", weights_only=True)
    assert rank0.keys() == rank1.keys() == saved.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ in {key}"
        assert torch.equal(rank0[key], saved[key]), f"model.pt differs from rank 0 in {key}"
    moved = 0
    kernels = (
        "downsamples.0.conv1.conv.weight",
        "bottleneck.conv2.conv.weight",
        "upsamples.1.conv_block.conv1.conv.weight",
    )
    for key in kernels:
        changed = (rank0[key] != foundation[key]).view(foundation[key].shape[0], -1).sum(1)
        assert int(changed.max()) <= ITERATIONS, key  # strict DGST, gamma 1: one entry per filter per step
        moved += int(changed.sum())
    assert moved > 0, "fine-tuning did not update anything"
