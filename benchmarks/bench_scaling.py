"""How the costs grow: iteration time against network width and patch size (full vs DGST), inference time
against volume size.

Training uses bench_dgst's set-up (a real MONAI ``SupervisedTrainer`` with the real ``DGSTHandler``, the
bundle's fine-tuning loss and optimizer, a fixed synthetic batch): for each configuration, ``full`` and
``dgst-strict`` are interleaved round-robin and the ratio of medians is reported, so the question "does DGST's
relative overhead stay flat as the network grows" is answered at equal conditions. Inference runs MONAI's
``SlidingWindowInferer`` (Gaussian, overlap 0.5) of the plan's inference network on volumes of growing size and
reports seconds per million voxels (flat if the time grows linearly in voxels).

Usage::

    python benchmarks/bench_scaling.py --json /tmp/scaling.json     # about 5 min on one thread
    python benchmarks/bench_scaling.py --quick                        # seconds: the smallest configurations
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dgst's helpers, whatever the working directory
import bench_dgst  # noqa: E402
from bench_dgst import ModeTrainer, log, median, parse_mode, write_results  # noqa: E402

#: widths of the paper plan's six stages, from cpu-small-like to the paper's own (32-64-128-256-320-320)
WIDTHS = {
    "base8": [8, 16, 32, 64, 80, 80],
    "base16": [16, 32, 64, 128, 160, 160],
    "paper": [32, 64, 128, 256, 320, 320],
}
#: patches (x, y, z) divisible by the paper plan's total strides (32, 16, 16)
PATCHES = [[64, 64, 32], [96, 96, 64], [128, 128, 64]]
VOLUMES = [[64, 64, 64], [128, 128, 64], [128, 128, 128], [192, 192, 128]]
MODES = ("full", "dgst-strict")


def train_case(filters: list[int], patch: list[int], rounds: int, warmup: int) -> dict[str, Any]:
    """Full and DGST strict interleaved on the paper plan with ``filters`` at ``patch``; medians and ratio."""
    args = bench_dgst.parse_args(["--plan", "paper", "--filters", *map(str, filters), "--patch", *map(str, patch)])
    torch.manual_seed(args.seed)
    base = bench_dgst.build_network(args)
    batch = bench_dgst.make_batch(args)
    trainers = [ModeTrainer(args, parse_mode(m), copy.deepcopy(base), batch) for m in MODES]
    raw: dict[str, list[float]] = {m: [] for m in MODES}
    handler: dict[str, list[float]] = {m: [] for m in MODES}  # the handler's own phases (full: clipping alone)
    for r in range(warmup + rounds):
        for trainer in trainers:
            t = trainer.run()
            if r >= warmup:
                raw[trainer.mode.name].append(t["total"])
                handler[trainer.mode.name].append(sum(t[p] for p in bench_dgst.HANDLER_PHASES))
    full, dgst = median(raw["full"]), median(raw["dgst-strict"])
    added = median(handler["dgst-strict"]) - median(handler["full"])
    out = {
        "filters": filters, "patch": patch, "raw_s": raw, "full_s": full, "dgst_s": dgst, "ratio": dgst / full,
        "paired_ratio": median([d / f for d, f in zip(raw["dgst-strict"], raw["full"])]),
        # DGST's added work over full's iteration, free of the forward/backward noise (as bench_dgst's)
        "added_s": added, "added_ratio": 1 + added / full,
        "parameters": sum(p.numel() for p in base.parameters()),
        "voxels": patch[0] * patch[1] * patch[2],
    }
    log(f"[train] filters {filters} patch {patch}: full {full:.2f} s, dgst {dgst:.2f} s, x{out['ratio']:.3f} "
        f"(paired x{out['paired_ratio']:.3f}, added work x{out['added_ratio']:.4f})")
    return out


@torch.inference_mode()
def infer_case(filters: list[int], patch: list[int], volume: list[int], repeats: int) -> dict[str, Any]:
    """Median sliding-window time of the plan's inference network on a random ``volume``."""
    args = bench_dgst.parse_args(["--plan", "paper", "--filters", *map(str, filters), "--patch", *map(str, patch)])
    net = bench_dgst.build_plan(args).network(1, 2, deep_supervision=False).eval()
    inferer = SlidingWindowInferer(roi_size=patch, sw_batch_size=2, overlap=0.5, mode="gaussian")
    image = torch.randn(1, 1, *volume)
    windows: list[int] = []  # windows per run: with overlap 0.5 they grow faster than voxels on small volumes

    def counted(x: torch.Tensor) -> torch.Tensor:
        windows.append(x.shape[0])
        return net(x)

    times = []
    for _ in range(repeats):
        windows.clear()
        t0 = time.perf_counter()
        inferer(image, counted)
        times.append(time.perf_counter() - t0)
    voxels = volume[0] * volume[1] * volume[2]
    out = {"volume": volume, "voxels": voxels, "windows": sum(windows), "raw_s": times, "seconds": median(times),
           "s_per_mvoxel": median(times) / voxels * 1e6, "s_per_window": median(times) / sum(windows)}
    log(f"[infer] volume {volume}: {out['seconds']:.2f} s, {out['windows']} windows, "
        f"{out['s_per_mvoxel']:.3f} s per M voxels, {out['s_per_window']:.3f} s per window")
    return out


def report(result: dict[str, Any]) -> str:
    lines = [f"Command: `{result['command']}`; {result['machine']}, torch {result['torch']}, "
             f"{result['threads']} thread(s).", "",
             "| filters | patch (x, y, z) | parameters (M) | full (s) | DGST strict (s) | ratio | paired ratio "
             "| DGST added (s) | 1 + added / full |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["train"]:
        lines.append(f"| {'-'.join(map(str, c['filters']))} | {'x'.join(map(str, c['patch']))} | "
                     f"{c['parameters'] / 1e6:.2f} | {c['full_s']:.2f} | {c['dgst_s']:.2f} | {c['ratio']:.3f} | "
                     f"{c['paired_ratio']:.3f} | {c['added_s']:.4f} | {c['added_ratio']:.4f} |")
    lines += ["", "| volume (x, y, z) | M voxels | windows | sliding window (s) | s per M voxels | s per window |",
              "|---|---|---|---|---|---|"]
    for c in result["inference"]:
        lines.append(f"| {'x'.join(map(str, c['volume']))} | {c['voxels'] / 1e6:.2f} | {c['windows']} | "
                     f"{c['seconds']:.2f} | {c['s_per_mvoxel']:.3f} | {c['s_per_window']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inference-width", default="base16", choices=sorted(WIDTHS))
    p.add_argument("--quick", action="store_true", help="smallest width and patch only, one round")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    widths = ["base8"] if a.quick else list(WIDTHS)
    patches = PATCHES[:1] if a.quick else PATCHES
    volumes = VOLUMES[:2] if a.quick else VOLUMES
    rounds = 1 if a.quick else a.rounds
    result: dict[str, Any] = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                              "machine": platform.platform(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    # width sweep at the smallest patch, then patch sweep at the middle width: each configuration is one pair
    cases = [(WIDTHS[w], patches[0]) for w in widths]
    mid = WIDTHS["base8" if a.quick else "base16"]
    cases += [(mid, patch) for patch in patches[1:]]
    result["train"] = [train_case(f, patch, rounds, a.warmup) for f, patch in cases]
    result["inference"] = [infer_case(WIDTHS[a.inference_width], PATCHES[0], v, 1 if a.quick else 2)
                           for v in volumes]
    result["loadavg_end"] = os.getloadavg()
    write_results(result, report(result), a.json, a.markdown)
    return result


if __name__ == "__main__":
    main()
