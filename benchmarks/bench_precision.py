"""float32 against bfloat16 (the bundles' ``--precision``) for one checkpoint, side by side in one run: the
bundle's file-to-file inference time, and how far the bfloat16 masks move (Dice with the float32 masks, and DSC
of each against the reference labels).

Each precision builds the bundle's own ``inference.json`` evaluator once; the rounds then run them in
alternating order over the same scans (load, resample, normalise, sliding window, invert, write the masks), and
the medians and their ratio are reported. What bfloat16 buys depends on the CPU: oneDNN runs bfloat16
convolutions on AMX / AVX-512 BF16 units (Intel Sapphire Rapids and newer, AMD Zen 4); elsewhere they may be
slower than float32.

Usage::

    python benchmarks/bench_precision.py --checkpoint foundation/model.pt --preset tiny \\
        --datalist docs/results/synthetic/multisite/splits.json --split test --cases 10 --json /tmp/precision.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dgst's helpers, whatever the working directory
from bench_dgst import write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16")


def build_evaluator(args: argparse.Namespace, precision: str, images: list[str], output_dir: Path) -> Any:
    """The bundle's inference evaluator for ``images`` at ``precision`` (CPU, no mirroring)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(args.bundle) / "configs" / "inference.json"))
    overrides = {"checkpoint": args.checkpoint, "datalist": images, "output_dir": str(output_dir),
                 "precision": precision, "mirror": False, "amp": False, "device": "$torch.device('cpu')"}
    if args.preset:
        overrides["preset"] = args.preset
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("evaluator")


def read_mask(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of the same grid (1 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {a.shape} and {b.shape} are not on the same grid")
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dgst_monai.data.datalists import load_split
    from dgst_monai.predict import mask_path

    torch.set_num_threads(args.threads)
    cases = load_split(args.datalist, args.split)[: args.cases]
    images = [c["image"] for c in cases]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    evaluators = {p: build_evaluator(args, p, images, work / p) for p in PRECISIONS}
    seconds: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(args.rounds):
        for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            t0 = time.perf_counter()
            evaluators[precision].run()
            seconds[precision].append(time.perf_counter() - t0)
            print(f"[round {r + 1}/{args.rounds}] {precision}: {seconds[precision][-1]:.1f} s for {len(images)} "
                  "scans", file=sys.stderr, flush=True)
    per_case = []
    for case in cases:
        masks = {p: read_mask(mask_path(case["image"], work / p)) for p in PRECISIONS}
        label = read_mask(Path(case["label"]))
        per_case.append({"case_id": case["case_id"], "dice_bf16_vs_fp32": dice(masks["bfloat16"], masks["float32"]),
                         "voxels_differ": int((masks["bfloat16"] ^ masks["float32"]).sum()),
                         **{f"dsc_{p}": dice(masks[p], label) for p in PRECISIONS}})
    med = {p: float(np.median(s)) for p, s in seconds.items()}
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
        "checkpoint": args.checkpoint, "preset": args.preset, "cases": len(cases), "rounds": args.rounds,
        "seconds": seconds, "median_s": med, "ratio_bf16_to_fp32": med["bfloat16"] / med["float32"],
        "paired_ratio": float(np.median([b / f for b, f in zip(seconds["bfloat16"], seconds["float32"])])),
        "per_case": per_case,
        "mean": {k: float(np.mean([c[k] for c in per_case]))
                 for k in ("dice_bf16_vs_fp32", "dsc_float32", "dsc_bfloat16")},
        "min_dice_bf16_vs_fp32": min(c["dice_bf16_vs_fp32"] for c in per_case),
    }


def report(result: dict[str, Any]) -> str:
    m = result["mean"]
    return "\n".join([
        f"Command: `{result['command']}`; {result['machine']}, torch {result['torch']}, {result['threads']} "
        f"thread(s), load average {', '.join(f'{x:.2f}' for x in result['loadavg'])}.",
        "",
        "| precision | median time for the scans (s) | ratio to float32 | mean DSC vs labels (%) |",
        "|---|---|---|---|",
        f"| float32 | {result['median_s']['float32']:.1f} | 1.000 | {100 * m['dsc_float32']:.2f} |",
        f"| bfloat16 | {result['median_s']['bfloat16']:.1f} | {result['ratio_bf16_to_fp32']:.3f} "
        f"(paired {result['paired_ratio']:.3f}) | {100 * m['dsc_bfloat16']:.2f} |",
        "",
        f"{result['cases']} scans, {result['rounds']} rounds. Dice of the bfloat16 masks with the float32 ones: "
        f"mean {m['dice_bf16_vs_fp32']:.4f}, lowest {result['min_dice_bf16_vs_fp32']:.4f}.",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(REPO / "bundles" / "ln_ct_dynunet"))
    p.add_argument("--checkpoint", required=True, help="weights (normalization.json beside them)")
    p.add_argument("--preset", help="the network the checkpoint was trained with (e.g. tiny)")
    p.add_argument("--datalist", required=True, help="MONAI datalist or splits.json with images and labels")
    p.add_argument("--split", default="test")
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/bench_precision")
    p.add_argument("--json")
    p.add_argument("--markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    write_results(result, report(result), args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
