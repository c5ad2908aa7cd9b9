"""Parameter accounting against hand counts, and the strict-DGST bound against a real tune."""

from __future__ import annotations

from helpers import decay_sgd
from monai.networks.nets import DynUNet
from torch import nn

from dgst_monai import METHODS, DGSTHandler
from dgst_monai.accounting import account_methods, count_changed, format_table
from dgst_monai.sparsity import group_rows

K3 = 27  # entries of a 3x3x3 kernel


def three_level_dynunet() -> DynUNet:
    """Blocks 1->2, 2->4 (stride 2), 4->8 (stride 2); up blocks 8->4, 4->2 (transposed convs 2x2x2); head 2->2."""
    return DynUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[2, 4, 8],
        norm_name=("INSTANCE", {"affine": True}),
    )


# Hand counts of three_level_dynunet(), layer by layer (convs have no bias; the head conv has one).
CONVS = {  # name: (in, out, kernel entries); a conv weight is (out, in, k), a transposed conv's (in, out, k)
    "input_block.conv1": (1, 2, K3),  # 54
    "input_block.conv2": (2, 2, K3),  # 108
    "downsamples.0.conv1": (2, 4, K3),  # 216
    "downsamples.0.conv2": (4, 4, K3),  # 432
    "bottleneck.conv1": (4, 8, K3),  # 864
    "bottleneck.conv2": (8, 8, K3),  # 1728
    "upsamples.0.transp_conv": (8, 4, 8),  # 256
    "upsamples.0.conv_block.conv1": (8, 4, K3),  # 864 (skip concat: 4 + 4 in)
    "upsamples.0.conv_block.conv2": (4, 4, K3),  # 432
    "upsamples.1.transp_conv": (4, 2, 8),  # 64
    "upsamples.1.conv_block.conv1": (4, 2, K3),  # 216 (2 + 2 in)
    "upsamples.1.conv_block.conv2": (2, 2, K3),  # 108
}
CONV_ENTRIES = 54 + 108 + 216 + 432 + 864 + 1728 + 256 + 864 + 432 + 64 + 216 + 108  # 5342
NORM = 2 * (2 + 2) + 2 * (4 + 4) + 2 * (8 + 8) + 2 * (4 + 4) + 2 * (2 + 2)  # weight + bias of two norms per block
HEAD = 2 * 2 + 2  # 6
TOTAL = CONV_ENTRIES + NORM + HEAD  # 5428
ENCODER = (54 + 108 + 8) + (216 + 432 + 16) + (864 + 1728 + 32)  # 3458
DECODER = (256 + 864 + 432 + 16) + (64 + 216 + 108 + 8) + HEAD  # 1970
# filters (rows of weight.view(shape[0], -1)) and row lengths of the sparsified kernels, in CONVS order;
# a transposed conv has one row per *input* channel
ROWS = [
    (2, 27), (2, 54), (4, 54), (4, 108), (8, 108), (8, 216), (8, 32), (4, 216), (4, 108), (4, 16), (2, 108), (2, 54)
]
LORA_ADDED = 38240  # sum of 32 * in * k + out * 32 over CONVS
# Houlsby adapters after the five conv2 (channels 2, 4, 8, 4, 2; widths 1, 1, 2, 1, 1): down c*h + bias h, up h*c
ADAPTER_ADDED = (2 + 1 + 2) + (4 + 1 + 4) + (16 + 2 + 16) + (4 + 1 + 4) + (2 + 1 + 2)  # 62
SPATIAL_ADDED = 2 * (2 * 2 * K3)  # two bias-free 3x3x3 convs 2 -> 2 on the logits: 216


def test_hand_counts_of_every_method():
    net = three_level_dynunet()
    assert sum(p.numel() for p in net.parameters()) == TOTAL == 5428
    rows = {r.method: r for r in account_methods(net, steps=30)}
    assert set(rows) == set(METHODS)
    trainable = {
        "scratch": TOTAL,
        "full": TOTAL,
        "linear_probe": HEAD,
        "bias": 2,  # only the head conv has a bias
        "norm": NORM,
        "bias_norm": NORM + 2,
        "bias_norm_head": NORM + HEAD,  # DGST's always-trained set: the head's bias is part of HEAD
        "encoder": ENCODER,
        "decoder": DECODER,
        "drst": TOTAL,
        "sgst": TOTAL,
        "dgst": TOTAL,
        "lora": LORA_ADDED + HEAD,  # the head trains beside LoRA, as in the released trainer
        "adapter": ADAPTER_ADDED + HEAD,
        "spatial_adapter": SPATIAL_ADDED,  # the black box: nothing of the foundation trains
    }
    assert sum(32 * i * k + o * 32 for i, o, k in CONVS.values()) == LORA_ADDED
    for name, expected in trainable.items():
        assert rows[name].trainable_entries == expected, name
        assert rows[name].network_entries == TOTAL
    assert rows["lora"].added_entries == LORA_ADDED and rows["adapter"].added_entries == ADAPTER_ADDED == 62
    assert rows["spatial_adapter"].added_entries == SPATIAL_ADDED == 216
    assert rows["full"].added_entries == 0

    dense = NORM + HEAD  # biases, norms and heads always train whole under dgst / drst / sgst
    assert sum(r for r, _ in ROWS) == 52
    for name in ("dgst", "drst", "sgst"):
        assert rows[name].step_bound == 52 + dense
    # after 30 steps: min(30, row length) per filter; the first conv's rows (27) and the last transposed conv's
    # (16) are shorter than 30
    assert rows["dgst"].steps_bound == 2 * 27 + 4 * 16 + 30 * (52 - 2 - 4) + dense
    assert rows["drst"].steps_bound == rows["dgst"].steps_bound
    assert rows["sgst"].steps_bound == 52 + dense  # one static mask, chosen before the first update
    # merged LoRA may rewrite every conv outside the head; the adapters stay beside the foundation, whose heads
    # alone train; the spatial adapter changes no foundation entry at all
    assert rows["lora"].step_bound == CONV_ENTRIES + HEAD
    assert rows["adapter"].step_bound == HEAD
    assert rows["spatial_adapter"].step_bound == rows["spatial_adapter"].steps_bound == 0
    assert rows["bias"].step_bound == rows["bias"].steps_bound == 2
    assert abs(rows["norm"].trainable_fraction - NORM / TOTAL) < 1e-12

    gamma2 = {r.method: r for r in account_methods(net, ["dgst"], gamma=2)}
    assert gamma2["dgst"].step_bound == 2 * 52 + dense and gamma2["dgst"].steps_bound is None


def test_changed_entries_are_counted_once():
    """Changed entries come from named_parameters (DynUNet's state dict lists the encoder twice)."""
    net = three_level_dynunet()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    tuned = {k: v.clone() for k, v in base.items()}
    for key in ("input_block.conv1.conv.weight", "skip_layers.downsample.conv1.conv.weight"):  # the same tensor
        tuned[key].view(-1)[:5] += 1
    tuned["output_block.conv.conv.bias"][1] = -1.0
    names = dict(net.named_parameters())
    assert count_changed(base, tuned, names) == 6
    rows = account_methods(net, ["full", "dgst"], base_state=base, tuned_states={"dgst": tuned})
    assert rows[0].changed_entries is None and rows[1].changed_entries == 6
    assert abs(rows[1].changed_fraction - 6 / TOTAL) < 1e-12


def test_strict_dgst_stays_within_the_bound(tiny_dynunet, trainer_factory):
    """After N strict DGST steps each filter changed at most N entries, and the total is within the bound."""
    steps = 3
    net = tiny_dynunet()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = decay_sgd(net)
    trainer = trainer_factory(net, optimizer, iterations=steps)
    DGSTHandler(method="dgst", gamma=1, update="strict").attach(trainer)
    trainer.run()
    tuned = net.state_dict()

    (row,) = account_methods(net, ["dgst"], steps=steps, base_state=base, tuned_states={"dgst": tuned})
    assert 0 < row.changed_entries <= row.steps_bound < row.network_entries
    for name, param in net.named_parameters():
        if param.dim() == 5 and not name.startswith(("output_block.", "deep_supervision_heads.")):
            changed = group_rows(base[name] != tuned[name], "filter").sum(1)
            assert changed.max() <= steps, name
    table = format_table([row])
    assert f"after {steps} steps" in table and f"{row.changed_entries:,}" in table


def test_table_lists_every_method_and_explains_what_does_not_apply():
    net = three_level_dynunet()
    table = format_table(account_methods(net, steps=250))
    for name, method in METHODS.items():
        assert name in table and method.label in table
    assert "after 250 steps" in table and f"{TOTAL:,}" in table

    plain = nn.Sequential(nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))
    rows = {r.method: r for r in account_methods(plain, ["full", "encoder"])}
    assert rows["encoder"].trainable_entries is None and "register_network" in rows["encoder"].note
    assert "n/a" in format_table(rows.values())
