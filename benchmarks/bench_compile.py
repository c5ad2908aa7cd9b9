"""Eager against ``torch.compile`` (inductor) for the bundle's network on this CPU, in float32 and under
bfloat16 autocast (the bundles' ``precision: bfloat16``), side by side in one process.

Two phases, each a separate case per precision:

1. ``inference``: the forward pass of one sliding-window batch (``--batch`` windows, 2 = the bundle's
   ``sw_batch_size``) of the plan's inference network (no deep supervision, eval mode) under
   ``torch.inference_mode``, the output cast to float32 as ``dgst_monai.inferers.AutocastInferer`` does.
2. ``train``: one training step as the bundle fine-tunes: the deep-supervised network in train mode, the
   bundle's loss and optimizer (``train.json`` + ``finetune.json``: deep-supervision DiceCE, SGD with Nesterov
   momentum), forward under autocast with the output cast to float32, loss and backward outside autocast,
   gradient clipping (DGSTHandler's default norm) and ``optimizer.step()``.

Every variant (``eager``, ``compiled`` = ``torch.compile(net)`` with the default mode, optionally
``compiled-max-autotune`` = ``mode="max-autotune-no-cudagraphs"`` and, for inference, ``compiled-freezing`` =
``options={"freezing": True}``) has its own copy of the same initial weights. The first call of each is timed
on its own (for a compiled variant it includes the compilation: dynamo tracing, inductor lowering, the C++
compiler), and its output (training: output, loss and parameter gradients of the first step) is compared with
eager's. After ``--warmup`` untimed calls the variants run ``--rounds`` rounds in alternating order; reported
are the medians, the ratio of medians compiled / eager, the median of the per-round ratios (paired), the peak
RSS growth of a call over the RSS before it, and the maximum absolute difference to eager.

Each case compiles in a fresh, empty inductor cache (unless ``--warm-cache``), so the first call of its first
compiled variant is a cold compile; later variants of the same case share that cache (``compiled-freezing``
reuses most of ``compiled``'s kernels, so its first call is not a cold compile). Inductor compiles in
``--threads`` worker(s). If ``torch.compile`` fails (inductor needs a C++ compiler and the Python headers), the
exact error is recorded and reported and the case reports eager alone.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --preset paper --patch 96 96 64 --rounds 3 \\
        --variants default freezing --json /tmp/bench_compile.json --markdown /tmp/bench_compile.md
        # about 25 min on one core (compiles about 1.5 min per inference graph, 2-2.5 min per training graph)
    python benchmarks/bench_compile.py --preset tiny --base-filters 4 --patch 32 32 16 --rounds 1   # minutes
    python benchmarks/bench_compile.py --preset tiny --patch 32 32 16 --backend aot_eager --rounds 1  # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch._dynamo
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dgst's helpers, whatever the working directory
import bench_dgst  # noqa: E402
from bench_dgst import log, median, write_results  # noqa: E402

from dgst_monai.memory import cpu_model, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

PRECISIONS = ("float32", "bfloat16")
PHASES = ("inference", "train")
#: compiled variants: name in the results -> keyword arguments of torch.compile (besides the backend)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "freezing": {"options": {"freezing": True}},  # inductor's weight freezing: inference only (no autograd)
}
#: gradient clipping of the bundle's fine-tuning (DGSTHandler's default)
CLIP: float = bench_dgst.CLIP


def variant_name(variant: str) -> str:
    return "compiled" if variant == "default" else f"compiled-{variant}"


def build_plan(args: argparse.Namespace) -> Any:
    """The plan ``--preset`` (with ``--base-filters``) at ``--patch``, checked against its total strides."""
    from dgst_monai.networks import plan_preset

    overrides = {"base_filters": args.base_filters} if args.base_filters else {}
    plan = plan_preset(args.preset, **overrides)
    if args.patch:
        plan = dataclasses.replace(plan, patch_size=tuple(args.patch))
    plan.check_patch(plan.patch_size)
    return plan


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, precision))


@contextlib.contextmanager
def inductor_cache(warm: bool) -> Iterator[None]:
    """A fresh, empty inductor cache for the block (cold compiles), unless ``warm``."""
    if warm:
        yield
        return
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache
    with fresh():
        yield


def error_text(e: BaseException) -> str:
    """The exception as it was raised (type and message) and the innermost frame it came from."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" [at {tb[-1].filename}:{tb[-1].lineno}]" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def compile_network(net: nn.Module, backend: str, variant: str) -> Callable[..., Any]:
    """``torch.compile(net)`` with the variant's mode/options (lazy: compiles on the first call)."""
    return torch.compile(net, backend=backend, **VARIANTS[variant])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Timed:
    """Runs one call, timing it and its peak RSS growth over the RSS before it."""

    def __init__(self) -> None:
        self.can_reset = reset_peak_rss()

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float, dict[str, float]]:
        self.can_reset = reset_peak_rss()
        before = rss_mb()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        peak = peak_rss_mb()
        return out, seconds, {"rss_before_mib": before, "peak_mib": peak,
                              "peak_growth_mib": peak - before if self.can_reset else float("nan")}


def _first_calls(case: dict[str, Any], runners: dict[str, Callable[[bool], Any]], timed: Timed, tag: str) -> None:
    """Each variant's first call (compilation included) and its differences to eager; failing variants dropped."""
    reference: dict[str, Any] | None = None
    for name in list(runners):
        try:
            first, seconds, mem = timed(lambda: runners[name](True))
        except Exception as e:  # noqa: BLE001 - a compile error surfaces at the first call
            case["errors"][name] = error_text(e)
            log(f"{tag} {name}: first call failed: {case['errors'][name]}")
            del runners[name]
            continue
        entry = {"first_call_s": seconds, "first_call_memory": mem}
        if reference is None:
            reference = first
            entry["max_abs_output"] = float(first["output"].abs().max())
        else:
            entry.update(differences(first, reference))
        case["variants"][name] = entry
        log(f"{tag} {name}: first call {seconds:.1f} s"
            + (f", max abs diff to eager {entry['max_abs_diff']:.3g}" if "max_abs_diff" in entry else ""))


def _timed_rounds(args: argparse.Namespace, case: dict[str, Any], runners: dict[str, Callable[[bool], Any]],
                  timed: Timed, tag: str) -> None:
    """Warm-up calls, then ``args.rounds`` rounds with the variants' order reversed every other round."""
    names = list(runners)
    for name in names:
        case["variants"][name].update(seconds=[], warmup_s=[], peak_growth_mib=[], peak_mib=[])
    for _ in range(args.warmup):
        for name in names:
            case["variants"][name]["warmup_s"].append(timed(lambda: runners[name](False))[1])
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _, seconds, mem = timed(lambda: runners[name](False))
            entry = case["variants"][name]
            entry["seconds"].append(seconds)
            entry["peak_growth_mib"].append(mem["peak_growth_mib"])
            entry["peak_mib"].append(mem["peak_mib"])
        log(f"{tag} round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {case['variants'][n]['seconds'][-1]:.2f} s" for n in names))


def _medians_and_ratios(case: dict[str, Any], names: list[str]) -> None:
    """Median times, compile overhead, and each compiled variant's ratio to eager (plain and paired)."""
    for name in names:
        entry = case["variants"][name]
        entry["median_s"] = median(entry["seconds"])
        entry["median_peak_growth_mib"] = median(entry["peak_growth_mib"])
        entry["compile_s"] = entry["first_call_s"] - entry["median_s"]  # the first call's overhead over a call
    eager = case["variants"].get("eager")
    case["ratios"] = {}
    for name in names:
        if name == "eager" or eager is None:
            continue
        entry = case["variants"][name]
        case["ratios"][name] = {
            "ratio": entry["median_s"] / eager["median_s"],
            "paired_ratio": median([c / e for c, e in zip(entry["seconds"], eager["seconds"])]),
        }


def run_case(args: argparse.Namespace, phase: str, precision: str, plan: Any) -> dict[str, Any]:
    """Eager and the compiled variants of one (phase, precision): first calls, differences, alternating rounds."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters  # not cleared by reset(): counted from here
    graphs0, breaks0 = counters["stats"].get("unique_graphs", 0), sum(counters["graph_break"].values())
    torch.manual_seed(args.seed)
    image, label = bench_dgst.make_batch(SimpleNamespace(seed=args.seed, batch=args.batch, patch=list(plan.patch_size)))
    variants = [v for v in args.variants if not (phase == "train" and v == "freezing")]
    timed = Timed()
    case: dict[str, Any] = {"phase": phase, "precision": precision, "variants": {}, "errors": {}}
    if phase == "inference":
        base = plan.network(in_channels=1, out_channels=2, deep_supervision=False).eval()
    else:
        base = plan.network(in_channels=1, out_channels=2, deep_supervision=True).train()
    case["parameters"] = sum(p.numel() for p in base.parameters())

    runners: dict[str, Callable[[bool], Any]] = {}
    for name in ["eager", *map(variant_name, variants)]:
        model = copy.deepcopy(base)
        variant = next((v for v in variants if variant_name(v) == name), None)
        try:
            fn = model if variant is None else compile_network(model, args.backend, variant)
        except Exception as e:  # noqa: BLE001 - reported, the case goes on without this variant
            case["errors"][name] = error_text(e)
            log(f"[{phase} {precision}] {name}: torch.compile failed: {case['errors'][name]}")
            continue
        runners[name] = make_runner(args, phase, precision, model, fn, image, label)

    _first_calls(case, runners, timed, f"[{phase} {precision}]")
    names = list(runners)
    _timed_rounds(args, case, runners, timed, f"[{phase} {precision}]")
    _medians_and_ratios(case, names)
    case["dynamo"] = {"unique_graphs": counters["stats"].get("unique_graphs", 0) - graphs0,
                      "graph_breaks": sum(counters["graph_break"].values()) - breaks0}
    return case


def make_runner(args: argparse.Namespace, phase: str, precision: str, model: nn.Module, fn: Callable[..., Any],
                image: torch.Tensor, label: torch.Tensor) -> Callable[[bool], Any]:
    """One call of the phase for one variant; with ``capture`` it returns what is compared with eager."""
    if phase == "inference":
        def infer(capture: bool) -> Any:
            with torch.inference_mode(), autocast(precision):
                out = fn(image)
            out = out.float()
            return {"output": out} if capture else None

        return infer

    loss_fn, optimizer = bench_dgst.fine_tuning_parts(SimpleNamespace(bundle=args.bundle), model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(capture: bool) -> Any:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            out = fn(image)
        out = out.float()  # the loss and backward run outside autocast, in float32 (AutocastInferer)
        loss = loss_fn(out, label)
        loss.backward()
        grads = [p.grad.detach().clone() for p in params] if capture else None
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        value = loss.item()
        return {"output": out.detach(), "loss": value, "grads": grads} if capture else None

    return step


def differences(first: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """How far a compiled variant's first call is from eager's (same weights, same input)."""
    out = {"max_abs_diff": max_abs_diff(first["output"], reference["output"]),
           "max_abs_output": float(reference["output"].abs().max())}
    if "loss" in first:
        out["loss_abs_diff"] = abs(first["loss"] - reference["loss"])
        out["max_abs_grad_diff"] = max(max_abs_diff(g, r) for g, r in zip(first["grads"], reference["grads"]))
        out["max_abs_grad"] = max(float(r.abs().max()) for r in reference["grads"])
    return out


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Command: `{result['command']}`; {result['machine']}, {result['cpu']}, torch {result['torch']}, "
        f"backend {result['backend']}, {result['threads']} thread(s), load average at start "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_end'])}.",
        "",
        f"Plan {result['preset']} (filters {'-'.join(map(str, result['filters']))}), patch "
        f"{'x'.join(map(str, result['patch']))}, batch {result['batch']}; {result['rounds']} round(s) after "
        f"{result['warmup']} warm-up call(s); {'warm' if result['warm_cache'] else 'fresh (cold)'} inductor cache.",
        "",
        "| phase | precision | variant | first call (s) | compile (first - median, s) | median (s) | ratio to eager "
        "| paired ratio | max abs diff vs eager | peak RSS growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for name, v in case["variants"].items():
            ratio = case["ratios"].get(name)
            diff = "-" if "max_abs_diff" not in v else f"{v['max_abs_diff']:.3g} (of {v['max_abs_output']:.3g})"
            if "max_abs_grad_diff" in v:
                diff += f"; grads {v['max_abs_grad_diff']:.3g} (of {v['max_abs_grad']:.3g})"
            lines.append(
                f"| {case['phase']} | {case['precision']} | {name} | {v['first_call_s']:.1f} | "
                f"{'-' if name == 'eager' else format(v['compile_s'], '.1f')} | {v['median_s']:.3f} | "
                f"{'1.000' if ratio is None else format(ratio['ratio'], '.3f')} | "
                f"{'-' if ratio is None else format(ratio['paired_ratio'], '.3f')} | {diff} | "
                f"{v['median_peak_growth_mib']:.0f} |")
        for name, error in case["errors"].items():
            lines.append(f"| {case['phase']} | {case['precision']} | {name} | failed | - | - | - | - | - | - |")
    errors = [(c, n, e) for c in result["cases"] for n, e in c["errors"].items()]
    if errors:
        lines += ["", "torch.compile failed (these cases report eager only):", ""]
        for c, n, e in errors:
            lines += [f"- {c['phase']} {c['precision']} {n}:", "", "  ```", *("  " + x for x in e.splitlines()),
                      "  ```"]
    lines += ["", "Dynamo: " + "; ".join(
        f"{c['phase']} {c['precision']}: {c['dynamo']['unique_graphs']} graph(s), {c['dynamo']['graph_breaks']} "
        "graph break(s)" for c in result["cases"]) + f". Wall time {result['wall_s']:.0f} s."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", help="dgst_monai.networks plan preset (paper, cpu-small, tiny, ...)")
    p.add_argument("--base-filters", type=int, help="the plan's first-stage filters (default: the preset's)")
    p.add_argument("--patch", type=int, nargs=3, default=[96, 96, 64], metavar=("X", "Y", "Z"),
                   help="patch (window) size, divisible by the plan's total strides")
    p.add_argument("--batch", type=int, default=2, help="windows per forward (the bundle's sw_batch_size)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant after the first call")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads and inductor's compile workers")
    p.add_argument("--skip", nargs="*", default=[], choices=PHASES)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS),
                   help="compiled variants (freezing: inference only)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's cache (first call = a cache hit)")
    p.add_argument("--bundle", default=str(bench_dgst.BUNDLE), help="bundle whose fine-tuning loss and optimizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = args.threads
    plan = build_plan(args)
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": platform.platform(),
        "cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backend": args.backend, "preset": args.preset, "filters": list(plan.filters),
        "patch": list(plan.patch_size), "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup,
        "precisions": args.precisions, "variants": args.variants, "warm_cache": args.warm_cache,
        "loadavg_start": list(os.getloadavg()), "cases": [],
    }
    start = time.perf_counter()
    for phase in PHASES:
        if phase in args.skip:
            continue
        for precision in args.precisions:
            with inductor_cache(args.warm_cache):  # also the recompiles of the warm-up calls, if any
                result["cases"].append(run_case(args, phase, precision, plan))
            log(f"[{phase} {precision}] done; load average {os.getloadavg()}")
    result["compile_works"] = all(not c["errors"] for c in result["cases"])
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - start
    write_results(result, report(result), args.json, args.markdown)
    return result


if __name__ == "__main__":
    main()
