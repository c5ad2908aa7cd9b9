"""One-command GPU check: full vs DGST fine-tuning steps with AMP, sliding-window inference, and host syncs.

On a machine with CUDA it

1. times full and DGST (strict and gradient update) fine-tuning iterations of the bundle's trainer set-up
   (``bench_dgst.py``'s: a real MONAI ``SupervisedTrainer`` with the real ``DGSTHandler``, the bundle's loss and
   optimizer) with AMP, modes interleaved round-robin, and prints the ratios of medians to full;
2. checks that DGST's per-iteration work makes no host-device synchronisation: the handler's callbacks run under
   ``torch.cuda.set_sync_debug_mode("error")`` (a sync raises), and the whole iteration runs once under ``"warn"``
   so that the syncs of the rest of the step (MONAI's ``GradScaler.step`` checks ``found_inf`` on the host) are
   counted: DGST must add none over full;
3. times sliding-window inference (Gaussian weighting, overlap 0.5, AMP) of the plan's inference network on a
   synthetic volume.

Without CUDA it says that it skipped those parts and exits 0, after running the CPU side of the same code
path on a tiny network: one full and one DGST step of real trainers, checking that DGST's strict step changed
exactly the kernel entries the handler reports as selected and full changed (nearly) all of them.

Usage::

    bash benchmarks/gpu_check.sh                      # paper plan at 96x96x64 on CUDA; CPU-only: the tiny check
    bash benchmarks/gpu_check.sh --json /tmp/gpu.json # every raw number
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.inferers import SlidingWindowInferer
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dgst's helpers, whatever the working directory
import bench_dgst  # noqa: E402
from bench_dgst import Mode, fixed_batch_trainer, log, median, method_handler, parse_mode  # noqa: E402

from dgst_monai import DGSTHandler  # noqa: E402
from dgst_monai.sparsity import GradientSelector  # noqa: E402

#: The line a CPU-only run prints; tests look for it.
SKIP_MESSAGE = "SKIPPED the GPU parts: no CUDA device (torch.cuda.is_available() is False)"
GPU_MODES = ("full", "dgst-strict", "dgst-gradient")


def dgst_args(size: str, extra: list[str]) -> argparse.Namespace:
    """bench_dgst's argument namespace (plan, patch, batch, bundle, seed) for ``size`` plus ``extra`` flags."""
    return bench_dgst.parse_args(["--size", size, *extra])


def make_trainer(
    args: argparse.Namespace,
    mode: Mode,
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    device: torch.device,
    amp: bool,
    iterations: int = 1,
    around_handler: tuple[Callable[[Engine], None], Callable[[Engine], None]] | None = None,
) -> tuple[SupervisedTrainer, DGSTHandler | Any]:
    """A SupervisedTrainer of ``model`` on a fixed batch on ``device``, with the mode's fine-tuning handler.

    Args:
        args: bench_dgst's namespace (bundle whose loss and optimizer are used).
        mode: full / dgst-* mode.
        model: the network (moved to ``device``).
        batch: image and label, moved to ``device`` once (the data loader is not what is checked here).
        device: where to train.
        amp: MONAI's AMP (autocast + GradScaler).
        iterations: iterations per ``run()``.
        around_handler: callbacks registered just before and just after the handler on each of its iteration
            events (``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``), e.g. to switch the sync debug mode on and off.

    Returns:
        The trainer and the handler.
    """
    model = model.to(device)
    image, label = (t.to(device) for t in batch)
    trainer = fixed_batch_trainer(args, model, (image, label), iterations, device=device, amp=amp)
    events = (IterationEvents.BACKWARD_COMPLETED, IterationEvents.MODEL_COMPLETED)
    if around_handler:
        for event in events:
            trainer.add_event_handler(event, around_handler[0])
    handler = method_handler(mode)
    handler.attach(trainer)
    if around_handler:
        for event in events:
            trainer.add_event_handler(event, around_handler[1])
    return trainer, handler


# --------------------------------------------------------------------------------------------------------------
# CPU side (always): one real step per mode on a tiny network
# --------------------------------------------------------------------------------------------------------------


def cpu_path(args: argparse.Namespace) -> dict[str, Any]:
    """One full and one DGST strict step of real trainers on CPU; which kernel entries each step changed.

    Returns:
        Per mode: ``sparse_entries`` (entries of the kernels DGST sparsifies), ``changed_sparse`` (of those,
        entries whose value changed in the step), ``selected`` (the handler's count of selected entries, DGST
        only, its always-trained entries subtracted), ``changed_other`` / ``other_entries`` (the always-trained
        parameters), the step's loss and time.
    """
    torch.manual_seed(args.seed)
    base = bench_dgst.build_network(args)
    batch = bench_dgst.make_batch(args)
    out: dict[str, Any] = {}
    for name in ("full", "dgst-strict"):
        model = copy.deepcopy(base)
        sparse = set(GradientSelector(model, gamma=1).sparse)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer, handler = make_trainer(args, parse_mode(name), model, batch, torch.device("cpu"), amp=False)
        t0 = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - t0
        changed = {n: int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()}
        res = {
            "sparse_entries": sum(before[n].numel() for n in sparse),
            "changed_sparse": sum(changed[n] for n in sparse),
            "other_entries": sum(t.numel() for n, t in before.items() if n not in sparse),
            "changed_other": sum(c for n, c in changed.items() if n not in sparse),
            "loss": trainer.state.output["loss"].detach().item(),
            "seconds": seconds,
        }
        if isinstance(handler, DGSTHandler) and handler._kept is not None:
            # the handler's own count of the entries its masks let through; its masks cover every trainable
            # tensor, the always-trained ones (biases, norms) all True, so those are subtracted
            res["selected"] = int(handler._kept) - res["other_entries"]
        out[name] = res
        log(f"[cpu] {name}: changed {res['changed_sparse']}/{res['sparse_entries']} kernel entries, "
            f"{res['changed_other']}/{res['other_entries']} others, {seconds:.2f} s")
    return out


# --------------------------------------------------------------------------------------------------------------
# GPU side
# --------------------------------------------------------------------------------------------------------------


def gpu_times(args: argparse.Namespace, device: torch.device, rounds: int, warmup: int) -> dict[str, Any]:
    """Median AMP iteration time per mode, interleaved round-robin; ratios to full."""
    torch.manual_seed(args.seed)
    base = bench_dgst.build_network(args)
    batch = bench_dgst.make_batch(args)
    trainers = {m: make_trainer(args, parse_mode(m), copy.deepcopy(base), batch, device, amp=True)[0]
                for m in GPU_MODES}
    raw: dict[str, list[float]] = {m: [] for m in GPU_MODES}
    for r in range(warmup + rounds):
        for m, trainer in trainers.items():
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            trainer.run()
            torch.cuda.synchronize(device)  # the GPU's work, not just the launch
            if r >= warmup:
                raw[m].append(time.perf_counter() - t0)
    full = median(raw["full"])
    return {
        "raw_s": raw,
        "median_s": {m: median(v) for m, v in raw.items()},
        "ratio_to_full": {m: median(v) / full for m, v in raw.items()},
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
    }


def sync_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Host-device syncs of DGST's per-iteration work (must be none) and of the whole iteration per mode.

    The handler's callbacks run with ``set_sync_debug_mode("error")``: any sync in DGST's clipping, selection,
    masking or restore raises and is reported. Then one whole iteration per mode runs under ``"warn"`` and the
    sync warnings are counted (and their first lines kept), so that DGST's count can be compared with full's.
    """
    torch.manual_seed(args.seed)
    base = bench_dgst.build_network(args)
    batch = bench_dgst.make_batch(args)
    out: dict[str, Any] = {}
    # 1) DGST's callbacks under "error"
    def on(engine: Engine) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def off(engine: Engine) -> None:
        torch.cuda.set_sync_debug_mode(0)

    for m in GPU_MODES[1:]:
        trainer, _ = make_trainer(args, parse_mode(m), copy.deepcopy(base), batch, device, amp=True,
                                  iterations=2, around_handler=(on, off))
        try:
            trainer.run()
            out[f"{m}_handler_error"] = None
        except RuntimeError as e:  # the sync the handler made
            out[f"{m}_handler_error"] = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # 2) whole iteration under "warn": count syncs per mode
    for m in GPU_MODES:
        trainer, _ = make_trainer(args, parse_mode(m), copy.deepcopy(base), batch, device, amp=True)
        trainer.run()  # warm-up: first-call allocations and cuDNN benchmarking are not per-iteration
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: torch.cuda.set_sync_debug_mode("warn"))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, off)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.run()
        torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        out[f"{m}_syncs_per_iteration"] = len(syncs)
        out[f"{m}_sync_sites"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    out["dgst_adds_syncs"] = any(
        out[f"{m}_syncs_per_iteration"] > out["full_syncs_per_iteration"] for m in GPU_MODES[1:]
    )
    out["ok"] = not out["dgst_adds_syncs"] and all(out[f"{m}_handler_error"] is None for m in GPU_MODES[1:])
    return out


def gpu_inference(args: argparse.Namespace, device: torch.device, volume: list[int], repeats: int) -> dict[str, Any]:
    """Median sliding-window inference time (AMP, Gaussian, overlap 0.5) on a synthetic ``volume``."""
    plan = bench_dgst.build_plan(args)
    net = plan.network(in_channels=1, out_channels=2, deep_supervision=False).to(device).eval()
    inferer = SlidingWindowInferer(roi_size=list(args.patch), sw_batch_size=2, overlap=0.5, mode="gaussian")
    image = torch.randn(1, 1, *volume, device=device)
    times = []
    for r in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda"):
            pred = inferer(image, net).argmax(1)
        torch.cuda.synchronize(device)
        if r:  # the first one warms up cuDNN
            times.append(time.perf_counter() - t0)
    return {"volume": volume, "raw_s": times, "median_s": median(times), "foreground": int(pred.sum())}


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="nnunet", help="bench_dgst size of the GPU timings (default: the paper plan)")
    p.add_argument("--cpu-size", default="tiny", help="bench_dgst size of the CPU-side step check")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per mode on the GPU")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds on the GPU")
    p.add_argument("--volume", type=int, nargs=3, default=[256, 256, 160], help="inference volume (x y z)")
    p.add_argument("--inference-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", help="write every number here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when it passed (or skipped the GPU parts), 1 when DGST's path syncs or a step is wrong."""
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "cuda": cuda,
        "device_name": torch.cuda.get_device_name(0) if cuda else None,
    }
    print(f"torch {torch.__version__}, CUDA available: {cuda}" + (f" ({result['device_name']})" if cuda else ""))

    cpu = cpu_path(dgst_args(opts.cpu_size, []))
    result["cpu_path"] = cpu
    strict, full = cpu["dgst-strict"], cpu["full"]
    cpu_ok = strict.get("selected") == strict["changed_sparse"] > 0 and full["changed_sparse"] > strict["changed_sparse"]
    print(f"CPU path: full step changed {full['changed_sparse']}/{full['sparse_entries']} kernel entries; "
          f"DGST strict step changed {strict['changed_sparse']} (handler selected {strict.get('selected')}): "
          f"{'OK' if cpu_ok else 'WRONG'}")
    ok = cpu_ok
    if not cuda:
        print(SKIP_MESSAGE + ": AMP step timings, the host-sync check and GPU inference were not run.")
    else:
        device = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True
        args = dgst_args(opts.size, [])
        result["gpu_config"] = {"plan": args.plan, "filters": args.filters, "patch": args.patch, "batch": args.batch}
        result["sync"] = sync = sync_check(args, device)
        print("host syncs per iteration: " + ", ".join(f"{m} {sync[f'{m}_syncs_per_iteration']}" for m in GPU_MODES)
              + f" (full's: {sync['full_sync_sites']})")
        for m in GPU_MODES[1:]:
            print(f"{m} handler under sync_debug_mode('error'): {sync[f'{m}_handler_error'] or 'no sync'}")
        print(f"sync check: {'OK' if sync['ok'] else 'FAILED'}")
        result["times"] = times = gpu_times(args, device, opts.rounds, opts.warmup)
        for m in GPU_MODES:
            print(f"{m:<14} AMP iteration median {times['median_s'][m] * 1e3:8.1f} ms  "
                  f"ratio to full {times['ratio_to_full'][m]:.3f}")
        result["inference"] = inf = gpu_inference(args, device, opts.volume, opts.inference_repeats)
        print(f"sliding-window inference {inf['volume']}: median {inf['median_s']:.2f} s")
        ok = ok and sync["ok"]
    result["ok"] = ok
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
